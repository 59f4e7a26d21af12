"""Kernel selection in one place: fast paths on CUDA where available, the PyTorch reference elsewhere."""
from .grouped_mm import grouped_mm

__all__ = ["grouped_mm"]
