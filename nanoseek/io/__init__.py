from .hf import load_hf, read_hf_tensors, save_hf

__all__ = ["load_hf", "save_hf", "read_hf_tensors"]
