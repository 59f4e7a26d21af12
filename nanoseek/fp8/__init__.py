"""FP8 fine-grained mixed-precision training (DeepSeek-V3 §3.3) and the 128×128 block quantization of checkpoints."""
from .convert import FP8_LINEARS, convert_to_fp8
from .experts import FP8Experts
from .linear import FP8Linear, fp8_matmul

__all__ = ["FP8_LINEARS", "FP8Experts", "FP8Linear", "convert_to_fp8", "fp8_matmul"]
