"""Kernel selection in one place: fast paths on CUDA where available, the PyTorch reference elsewhere."""
import functools
import importlib.util

from .grouped_mm import grouped_mm

__all__ = ["grouped_mm", "have_triton"]


@functools.cache
def have_triton() -> bool:
    """Whether Triton is installed (CUDA builds of torch bring it; the CPU build does not)."""
    return importlib.util.find_spec("triton") is not None
