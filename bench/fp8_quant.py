"""FP8 quantization kernels alone (kernels/fp8_quant.py) on the wide config's training shapes: GB/s against the copy
rate measured in the same run. Experimental variants live here until one wins.

    python bench/fp8_quant.py
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import copy_tb_s, env, graph_time_ms, write_json  # noqa: E402
from nanoseek.kernels import fp8_quant  # noqa: E402
from nanoseek.kernels.fp8_quant import block_g, cdiv, group_tile, token_tiles  # noqa: E402


@triton.jit
def _act_mul_kernel(x_ptr, stride_xm, stride_xk, K, counts_ptr, G,
                    q_ptr, stride_qm, s_ptr, stride_sm, stride_sk,
                    qt_ptr, stride_qtk, st_ptr, stride_stt,
                    TOKENS: tl.constexpr, BLOCK_G: tl.constexpr, EXACT: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    g, start, end = group_tile(counts_ptr, G, pid_t, 128, BLOCK_G)
    if g >= G:
        return
    r = tl.arange(0, 128)
    rows = (start + r).to(tl.int64)
    cols = pid_k * 128 + r
    row_ok = rows < end
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
    ax = tl.abs(x)
    amax = tl.maximum(tl.max(ax, axis=1), 1e-12)
    if EXACT:
        s = tl.math.div_rn(amax, 448.0)
        q = tl.clamp(tl.math.div_rn(x, s[:, None]), -448.0, 448.0).to(tl.float8e4nv)
    else:
        s = tl.math.div_rn(amax, 448.0)
        q = tl.clamp(x * tl.math.div_rn(448.0, amax)[:, None], -448.0, 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=row_ok[:, None])
    tl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, s, mask=row_ok)
    if TOKENS:
        amax = tl.maximum(tl.max(ax, axis=0), 1e-12)
        s = tl.math.div_rn(amax, 448.0)
        if EXACT:
            q = tl.clamp(tl.math.div_rn(x, s[None, :]), -448.0, 448.0).to(tl.float8e4nv)
        else:
            q = tl.clamp(x * tl.math.div_rn(448.0, amax)[None, :], -448.0, 448.0).to(tl.float8e4nv)
        tokens = pid_t.to(tl.int64) * 128 + r
        tl.store(qt_ptr + cols[None, :].to(tl.int64) * stride_qtk + tokens[:, None], q)
        tl.store(st_ptr + pid_t * stride_stt + cols, s)


def act_variant(x, counts, tokens, exact, warps=8):
    M, K = x.shape
    G = counts.numel()
    q, s, qt, st = fp8_quant.act_buffers(M, K, G, tokens, x.device)
    _act_mul_kernel[(token_tiles(M, G), cdiv(K, 128))](
        x, x.stride(0), x.stride(1), K, counts, G, q, q.stride(0), s, s.stride(0), s.stride(1),
        *((qt, qt.stride(0), st, st.stride(0)) if tokens else (None, 0, None, 0)),
        TOKENS=tokens, BLOCK_G=block_g(G), EXACT=exact, num_warps=warps)
    return q, s, qt, st


@triton.jit
def _weight_t_kernel(w_ptr, stride_wg, stride_wn, stride_wk, N, K, Np, Kp, Nt, Kt,
                     q_ptr, qt_ptr, s_ptr, stride_sg, stride_sn, st_ptr, stride_stg, stride_stk):
    """W's blocks and Wᵀ's: the tile loaded twice (the second from L2), Wᵀ's from transposed addresses in fp32,
    so no fp8 tile is ever transposed or stored twice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, 128)
    rows = pid_n * 128 + r
    cols = pid_k * 128 + r
    w = tl.load(w_ptr + g * stride_wg + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(w)), 1e-12)
    s = tl.math.div_rn(amax, 448.0)
    inv = tl.math.div_rn(448.0, amax)
    tl.store(q_ptr + g * Np * Kp + rows[:, None] * Kp + cols[None, :],
             tl.clamp(w * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(s_ptr + g * stride_sg + pid_n * stride_sn + pid_k, s)
    tl.store(st_ptr + g * stride_stg + pid_k * stride_stk + pid_n, s)
    # Wᵀ's block (pid_k, pid_n): element [c, n] = W[n, c]
    wt = tl.load(w_ptr + g * stride_wg + rows[None, :] * stride_wn + cols[:, None] * stride_wk,
                 mask=(rows[None, :] < N) & (cols[:, None] < K), other=0.0).to(tl.float32)
    tl.store(qt_ptr + g * Np * Kp + cols[:, None] * Np + rows[None, :],
             tl.clamp(wt * inv, -448.0, 448.0).to(tl.float8e4nv))


def weight_variant(w):
    w3 = w if w.dim() == 3 else w[None]
    G, N, K = w3.shape
    q, s, st = fp8_quant.weight_buffers(G, N, K, w.device)
    (_, Np, Kp), (_, Nt, Kt) = q.shape, s.shape
    qt = torch.empty(G, Kp, Np, dtype=q.dtype, device=q.device)
    _weight_t_kernel[(Nt, Kt, G)](w3, w3.stride(0), w3.stride(1), w3.stride(2), N, K, Np, Kp, Nt, Kt,
                                  q, qt, s, s.stride(0), s.stride(1), st, st.stride(0), st.stride(1), num_warps=8)
    return q, qt, s, st


def counts_for(rows, groups):
    g = torch.Generator().manual_seed(0)
    w = torch.rand(groups, generator=g) + 0.5
    c = (w / w.sum() * rows).floor().to(torch.int32)
    c[0] += rows - int(c.sum())
    return c.cuda()


def main():
    torch.manual_seed(0)
    copy = copy_tb_s()
    print(env())
    print(f"copy {copy:.2f} TB/s")
    results = {"env": env(), "copy_tb_s": copy, "act": [], "weight": []}
    acts = [("x (attn/shared in)", 8192, 4096, 1), ("dy kv_b", 8192, 8192, 1), ("dy q_a", 8192, 1536, 1),
            ("experts gate_up in", 32768, 4096, 16), ("experts down in", 32768, 1408, 16),
            ("dy experts gate_up", 32768, 2816, 16)]
    print(f"\n{'activation':22s} {'tokens':>6s} {'variant':>8s} {'us':>8s} {'GB/s':>7s} {'of copy':>7s} exact")
    for name, M, K, G in acts:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.rand(M, 1, device="cuda").bfloat16()
        counts = counts_for(M, G)
        for tokens in (False, True):
            ref = fp8_quant.act_quant(x, counts, tokens)
            nbytes = M * K * (2 + 1 + (1 if tokens else 0))
            for label, fn in (("current", lambda: fp8_quant.act_quant(x, counts, tokens)),
                              ("exact8", lambda: act_variant(x, counts, tokens, True)),
                              ("mul8", lambda: act_variant(x, counts, tokens, False)),
                              ("mul4", lambda: act_variant(x, counts, tokens, False, 4)),
                              ("mul16", lambda: act_variant(x, counts, tokens, False, 16))):
                us = graph_time_ms(fn) * 1e3
                out = fn()
                if label == "current":
                    same = "-"
                else:
                    same = torch.equal(out[0].view(torch.uint8), ref[0].q.view(torch.uint8))
                    if tokens:
                        same = same and torch.equal(out[2].view(torch.uint8), ref[1].q.view(torch.uint8))
                    diff = (out[0].float() - ref[0].q.float()).abs().max().item()
                    same = f"{same} (max diff {diff:g})"
                gbs = nbytes / us / 1e3
                print(f"{name:22s} {str(tokens):>6s} {label:>8s} {us:8.1f} {gbs:7.0f} {gbs / copy / 1e3:7.0%} {same}")
                results["act"].append({"name": name, "M": M, "K": K, "G": G, "tokens": tokens, "variant": label,
                                       "us": us, "gb_s": gbs})
    weights = [("experts gate_up", (16, 2816, 4096)), ("experts down", (16, 4096, 1408)),
               ("dense gate/up", (11264, 4096)), ("q_b", (6144, 1536)), ("kv_a", (576, 4096))]
    print(f"\n{'weight':18s} {'variant':>12s} {'us':>8s} {'GB/s':>7s} qt exact")
    for name, shape in weights:
        w = torch.randn(*shape, device="cuda") * 0.02
        nbytes = w.numel() * 6
        ref = fp8_quant.weight_quant(w)
        for label, fn in (("current+copy", lambda: fp8_quant.weight_quant(w)), ("fused Wt", lambda: weight_variant(w))):
            us = graph_time_ms(fn) * 1e3
            out = fn()
            qt = out[1] if label == "fused Wt" else out.qt
            q = out[0] if label == "fused Wt" else out.q
            qt = qt if w.dim() == 3 else qt.reshape(ref.qt.shape)
            exact = torch.equal(qt.view(torch.uint8), q.reshape(ref.q.shape).transpose(-1, -2).contiguous()
                                .view(torch.uint8))
            gbs = nbytes / us / 1e3
            print(f"{name:18s} {label:>12s} {us:8.1f} {gbs:7.0f} {exact}")
            results["weight"].append({"name": name, "shape": shape, "variant": label, "us": us, "gb_s": gbs,
                                      "qt_is_transpose": exact})
    write_json("fp8_quant.json", results)


if __name__ == "__main__":
    main()
