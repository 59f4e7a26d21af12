"""nanoseek: DeepSeek-V3 / R1 in compact PyTorch."""
from .config import ModelConfig, preset
from .model import DeepSeekV3

__version__ = "0.1.0"
__all__ = ["ModelConfig", "preset", "DeepSeekV3", "__version__"]
