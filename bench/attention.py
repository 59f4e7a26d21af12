"""MLA's training attention core alone: causal SDPA forward and forward + backward at a config's shapes, by backend
and head-dim padding, with the time per useful FLOP (d_qk and d_v unpadded) so that paddings compare fairly.

    python bench/attention.py [--preset small] [--batch 8] [--seq 2048]

Rows: the model's call (cuDNN, d_v < d_qk, q and k as (B, T, nh, d) transposed views, v a slice of kv_b_proj's
output), q and k (and v) contiguous as (B, nh, T, d) instead, v zero-padded to d_qk, both padded to the next
multiple of 64, and PyTorch's flash backend (FlashAttention-2, one head dim for q, k and v). The "out" column is the
layout cuDNN gives the output (it follows q's); o_proj wants (B, T, nh·d_v), so "bhtd" costs the model a copy of
the output forward and of its gradient backward, which these timings leave out.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import cuda_time_ms, env, median, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402


def make(B, T, nh, d, pad, layout, d_nope=0):
    """q, k or v as (B, nh, T, pad) bf16, zero-padded from d. layout "bhtd": contiguous; "bthd": a transposed view
    of (B, T, nh, pad), as the model's q and k; "kv": the model's v, the last `pad` of each head's d_nope + pad
    columns of kv_b_proj's output, transposed."""
    if layout == "kv":
        return torch.randn(B, T, nh, d_nope + pad, device="cuda", dtype=torch.bfloat16)[..., d_nope:].transpose(1, 2)
    x = F.pad(torch.randn(B, T, nh, d, device="cuda", dtype=torch.bfloat16), (0, pad - d)).transpose(1, 2)
    return x.contiguous() if layout == "bhtd" else x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    cfg = preset(args.preset)
    B, T, nh = args.batch, args.seq, cfg.num_attention_heads
    d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    up = lambda d: -(-d // 64) * 64   # noqa: E731
    cudnn, flash = [SDPBackend.CUDNN_ATTENTION], [SDPBackend.FLASH_ATTENTION]
    d_nope = cfg.qk_nope_head_dim
    # (name, backends, padded d_qk, padded d_v, layout of q and k, layout of v)
    runs = [("cuDNN, the model's call", cudnn, d_qk, d_v, "bthd", "kv"),
            ("cuDNN, q and k contiguous (B, nh, T, d)", cudnn, d_qk, d_v, "bhtd", "kv"),
            ("cuDNN, q, k, v contiguous (B, nh, T, d)", cudnn, d_qk, d_v, "bhtd", "bhtd"),
            ("cuDNN, q, k, v (B, T, nh, d) views, v dense", cudnn, d_qk, d_v, "bthd", "bthd"),
            (f"cuDNN, v padded to {d_qk}", cudnn, d_qk, d_qk, "bthd", "bthd"),
            (f"cuDNN, both padded to {up(d_qk)}", cudnn, up(d_qk), up(d_qk), "bthd", "bthd"),
            (f"flash (FA2), v padded to {d_qk}", flash, d_qk, d_qk, "bthd", "bthd")]
    # causal: half the T² score matrix. Forward QKᵀ (d_qk) and PV (d_v); backward recomputes QKᵀ, then dV and dP
    # (d_v), dQ and dK (d_qk)
    fwd_flop = B * nh * T * T * (d_qk + d_v)
    step_flop = B * nh * T * T * (4 * d_qk + 3 * d_v)
    scale = d_qk ** -0.5
    print(f"{torch.cuda.get_device_name()}  {args.preset}: B={B} T={T} heads={nh} d_qk={d_qk} d_v={d_v}")
    print(f"{'run':44s} {'out':>5s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} {'TFLOP/s':>8s}")
    results = []
    for name, backend, pqk, pv, qk_layout, v_layout in runs:
        q, k = (make(B, T, nh, d_qk, pqk, qk_layout).requires_grad_() for _ in range(2))
        v = make(B, T, nh, d_v, pv, v_layout, d_nope).requires_grad_()

        def fwd():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        try:
            out = fwd()
            dout = torch.randn_like(out)          # the output's own layout, as o_proj's backward gives it

            def step():   # the attention's own gradients only, not the copies autograd would add for views
                torch.autograd.grad(fwd(), (q, k, v), dout)
            t_fwd = median(cuda_time_ms(fwd, 3, 20))
            t_step = median(cuda_time_ms(step, 3, 20))
        except RuntimeError as e:
            print(f"{name:44s} not run: {str(e).splitlines()[0][:70]}")
            results.append({"run": name, "error": str(e).splitlines()[0]})
            continue
        out_layout = "bhtd" if out.is_contiguous() else "bthd"
        tf = lambda flop, ms: flop / (ms * 1e-3) / 1e12   # noqa: E731
        print(f"{name:44s} {out_layout:>5s} {t_fwd:8.3f} {tf(fwd_flop, t_fwd):8.0f} {t_step:11.3f} "
              f"{tf(step_flop, t_step):8.0f}")
        results.append({"run": name, "fwd_ms": t_fwd, "step_ms": t_step, "d_qk": pqk, "d_v": pv, "qk": qk_layout,
                        "v": v_layout, "out": out_layout})
    write_json("attention.json", {"env": env(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
