"""Auxiliary-loss-free load balancing (V3 §2.1.2) and the load telemetry that shows it working.

After each optimizer step, per MoE layer, with c_i the tokens routed to expert i during that step (summed over
its micro-batches):   b_i += γ · sign(mean(c) − c_i)
Overloaded experts get their selection bias lowered, underloaded ones raised. The bias only steers top-k
selection (model/moe.py); it gets no gradient, and it is saved with the model as `e_score_correction_bias`.
Under data parallelism, sum `load` over ranks first so every rank applies the same update.
"""
import torch


@torch.no_grad()
def update_bias(gates, load: torch.Tensor, gamma: float) -> None:
    """gates: model.moe_gates(); load: (n_moe_layers, n_routed_experts) token counts in the same order."""
    for gate, c in zip(gates, load.float()):
        gate.e_score_correction_bias.add_(torch.sign(c.mean() - c), alpha=gamma)


def load_ratio(load: torch.Tensor) -> torch.Tensor:
    """Per layer: the busiest expert's load over the mean load. 1.0 is perfect balance; top-k of N experts
    with every token on the same experts gives N/k."""
    load = load.float()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-9)
