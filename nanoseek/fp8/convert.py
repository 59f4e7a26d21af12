"""Switch a model to FP8 training (V3 §3.3.1): the attention projections, dense MLPs, shared experts, MTP
projections and routed experts run their GEMMs in FP8; the embedding, output head, MoE gate, norms and the
attention core (softmax(q kᵀ) v) stay in higher precision.

Linear modules are swapped in place around their existing Parameter objects and expert modules converted in place,
so the state_dict keys, the parameters an optimizer holds and the checkpoints (nanoseek.io.save_hf / load_hf) are
unchanged.
"""
from __future__ import annotations

from torch import nn

from ..model.moe import Experts
from .experts import FP8Experts, to_fp8_experts
from .linear import FP8Linear

# HF names of the Linear layers DeepSeek-V3 runs in FP8 (lm_head is not among them)
FP8_LINEARS = frozenset({"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                         "gate_proj", "up_proj", "down_proj", "eh_proj"})


def convert_to_fp8(model: nn.Module, emulate: bool | None = None) -> nn.Module:
    """Swap the FP8 layers of `model` in place and return it. emulate: None = real FP8 for CUDA tensors and the
    exact emulation elsewhere (decided per call, so the model may move between devices); True = always emulate."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in FP8_LINEARS:
                setattr(parent, name, FP8Linear.from_linear(child, emulate))
            elif isinstance(child, Experts) and not isinstance(child, FP8Experts):   # EPExperts too
                to_fp8_experts(child, emulate)
    return model
