from .moe import Experts, Gate, MoE, RouterStats
from .transformer import DeepSeekV3, Loss, Output

__all__ = ["DeepSeekV3", "Output", "Loss", "MoE", "Gate", "Experts", "RouterStats"]
