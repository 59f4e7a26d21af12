"""MLA's q/k assembly with RoPE (kernels/rope.py) alone: the Triton kernels against inductor's code for the same
PyTorch reference, forward (q and k) and backward (q's gradient, then k's split into k_nope's and the head sum of
k_rope's), at small's shapes (batch 8 × 2048, 8 heads, d_nope 64, d_rope 32), bf16. GPU time of 20 calls replayed
as one CUDA graph; bytes = what each must read and write once. --sweep times k's backward kernel at other
tile sizes and warp counts.

    python3 bench/rope.py [--batch 8] [--seq 2048] [--heads 8] [--sweep]
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, graph_time_ms, write_json  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.kernels import rope, rope_triton  # noqa: E402
from nanoseek.model.rope import inv_frequencies, rope_cos_sin  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    B, T, H, d_nope, d_rope = args.batch, args.seq, args.heads, 64, 32
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, T, H, d_nope + d_rope, **bf16)
    kv = torch.randn(B, T, H, d_nope + 64, **bf16)         # W_UKV's output: k_nope is a strided view of it
    kv_a = torch.randn(B, T, 256 + d_rope, **bf16)          # W_DKV's output: k_rope likewise
    k_nope, k_rope = kv[..., :d_nope], kv_a[..., 256:]
    cos, sin = (t.cuda() for t in rope_cos_sin(inv_frequencies(preset("small")), torch.arange(T).expand(1, T)))
    dq, dk = torch.randn_like(q), torch.randn_like(q)
    e = 2   # bytes per element
    cases = {   # name: (Triton, the reference compiled, bytes)
        "forward (q, k)": (lambda: rope_triton.rope_qk(q, k_nope, k_rope, cos, sin, True),
                           lambda: ref_fwd(q, k_nope, k_rope, cos, sin, True),
                           e * B * T * (2 * H * (d_nope + d_rope) + H * d_nope + d_rope + H * (d_nope + d_rope))),
        "backward (dq; dk -> dk_nope, dk_rope)": (
            lambda: rope_triton.rope_qk_backward(dq, dk, cos, sin, d_nope, True),
            lambda: ref_bwd(dq, dk, cos, sin, d_nope, True),
            e * B * T * (2 * H * (d_nope + d_rope) + H * (d_nope + d_rope) + H * d_nope + d_rope)),
    }
    ref_fwd = torch.compile(rope.rope_qk_reference)
    ref_bwd = torch.compile(rope.rope_qk_backward_reference)
    copy = copy_tb_s()
    results = {"env": env(), "shape": vars(args), "copy_tb_s": copy, "runs": []}
    print(f"{'step':40s} {'triton ms':>10s} {'TB/s':>6s} {'inductor ms':>12s} {'TB/s':>6s} {'speedup':>8s}")
    for name, (ours, ref, nbytes) in cases.items():
        for got, want in zip(ours(), ref()):
            torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7)
        a, b = graph_time_ms(ours), graph_time_ms(ref)
        results["runs"].append({"step": name, "triton_ms": a, "inductor_ms": b, "bytes": nbytes})
        print(f"{name:40s} {a:10.4f} {nbytes / a / 1e9:6.2f} {b:12.4f} {nbytes / b / 1e9:6.2f} {b / a:7.2f}x")
    print(f"copy {copy:.2f} TB/s")
    if args.sweep:
        d_k_nope, d_k_rope = dk.new_empty(B, T, H, d_nope), dk.new_empty(B, T, d_rope)
        cos_b, sin_b = cos.expand(B, T, -1), sin.expand(B, T, -1)
        nbytes = e * B * T * (H * (d_nope + d_rope) + H * d_nope + d_rope)
        p_h = triton.next_power_of_2(H)
        print("\nk's backward alone (elements of dk per program, warps): ms, TB/s")
        for elements in (2048, 4096, 8192, 16384, 32768):
            block_t = 1 << (max(elements // (p_h * (d_nope + d_rope)), 1).bit_length() - 1)
            for warps in (2, 4, 8):
                ms = graph_time_ms(lambda: rope_triton._k_backward_kernel[(triton.cdiv(T, block_t), B)](
                    dk, cos_b, sin_b, d_k_nope, d_k_rope, T, H, dk.stride(0), dk.stride(1), dk.stride(2),
                    cos_b.stride(0), cos_b.stride(1), D_NOPE=d_nope, D_ROPE=d_rope, P_NOPE=d_nope, P_H=p_h,
                    BLOCK_T=block_t, INTERLEAVE=True, num_warps=warps))
                results["runs"].append({"sweep": [block_t, warps], "ms": ms})
                print(f"  {block_t:3d} positions ({elements:5d}), {warps} warps: {ms:.4f} {nbytes / ms / 1e9:6.2f}")
    write_json("rope.json", results)


if __name__ == "__main__":
    main()
