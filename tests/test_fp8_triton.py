"""The Triton FP8 kernels on CPU, through Triton's interpreter: their tiling, padding and layouts against the
PyTorch reference, and the GEMM paths chosen. Runs only when asked for (the CUDA check is tests/test_fp8_gpu.py):

    TRITON_INTERPRET=1 python -m pytest tests/test_fp8_triton.py      (triton 3.6 with numpy 2.2; under numpy 2.4
                                                                       the interpreter fails on loops over a kernel
                                                                       argument)

The interpreter's fp32 -> e4m3 conversion rounds wrongly when the rounding carries into the exponent (124.3 -> 64),
so quantized values are compared bit for bit only for inputs that quantize without rounding; scales (exact
division) and GEMMs (against the emulation on the same FP8 operands) are compared on random inputs. The interpreter
cannot show GPU miscompiles, such as the wrong transposed copies `tl.trans` of an fp8 tile gave on an H200.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter tests: run with TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from nanoseek.fp8 import hopper, paths  # noqa: E402
from nanoseek.fp8.linear import FP8Matmul  # noqa: E402
from nanoseek.fp8.quant import act_quant, act_quant_t, weight_quant  # noqa: E402
from nanoseek.kernels import fp8_gemm, fp8_quant  # noqa: E402

COUNTS = [130, 0, 1, 169]   # token tiles restart per group: 128 + 2 rows, none, a single row, 128 + 41 rows


def _exact(rows: int, cols: int, single_rows=()) -> torch.Tensor:
    """Values that quantize without rounding: random E4M3 normals with ±448 on a checkerboard, so that every tile of
    two or more elements (1×128, 128×1 or 128×128) has amax 448, scale 1 and q = x; `single_rows` (one-row groups,
    whose 128×1 tiles hold one element) are ±448 throughout."""
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    v = torch.where(v.isfinite() & (v.abs() >= 2 ** -6) & (v.abs() < 448), v, 1.0)
    big = torch.where(v < 0, -448.0, 448.0)
    board = (torch.arange(rows)[:, None] + torch.arange(cols)) % 2 == 0
    board[list(single_rows)] = True
    return torch.where(board, big, v)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_act_quant_layouts_match_reference():
    counts = torch.tensor(COUNTS)
    x = _exact(300, 200, single_rows=[130])
    rows, tokens = fp8_quant.act_quant(x, counts, tokens=True)
    q, _ = act_quant(x)
    assert torch.equal(_bits(rows.q[:, :200]), _bits(q)) and (rows.q[:, 200:].float() == 0).all()
    tile = 0
    for (qg, _), c in zip(act_quant_t(x, COUNTS), COUNTS):
        n = -(-c // 128)
        assert torch.equal(_bits(tokens.q[:200, tile * 128: tile * 128 + c]), _bits(qg))
        assert (tokens.q[:, tile * 128 + c: (tile + n) * 128].float() == 0).all()   # the group's last tile: padding
        assert (tokens.q[200:, tile * 128: (tile + n) * 128].float() == 0).all()   # padded features
        tile += n
    # scales: exact division, so random inputs compare bit for bit
    x = torch.randn(300, 200) * torch.logspace(-3, 2, 300)[:, None]
    rows, tokens = fp8_quant.act_quant(x, counts, tokens=True)
    assert torch.equal(rows.scale_inv, act_quant(x)[1])
    # column-major with a stride of exactly M (not rounded up to 4), the only 1×128 layout torch._scaled_mm takes
    assert fp8_quant.act_quant(torch.randn(298, 200))[0].scale_inv.stride() == (1, 298)
    tile = 0
    for (_, sg), c in zip(act_quant_t(x, COUNTS), COUNTS):
        n = -(-c // 128)
        assert torch.equal(tokens.scale_inv[tile: tile + n, :200].t(), sg)
        tile += n


def test_weight_quant_layouts_match_reference():
    w = _exact(3 * 300, 130).view(3, 300, 130)
    b = fp8_quant.weight_quant(w)
    for g in range(3):
        assert torch.equal(_bits(b.q[g, :300, :130]), _bits(weight_quant(w[g])[0]))
        assert torch.equal(_bits(b.qt[g].t()), _bits(b.q[g]))   # the transposed copy, padding included
    w = torch.randn(3, 300, 130) * torch.logspace(-2, 1, 3)[:, None, None]
    b = fp8_quant.weight_quant(w)
    for g in range(3):
        assert torch.equal(b.scale_inv[g], weight_quant(w[g])[1]) and torch.equal(b.scale_inv_t[g], b.scale_inv[g].t())


def test_zero_tiles_quantize_to_zero():
    x = torch.randn(300, 260)
    x[:5], x[:, 128:256] = 0, 0                       # zero 1×128 tiles, zero 128×1 tiles
    rows, tokens = fp8_quant.act_quant(x, torch.tensor(COUNTS), tokens=True)
    w = torch.randn(2, 300, 200)
    w[0, :128, :128], w[1] = 0, 0                     # a zero 128×128 block, a zero expert
    b = fp8_quant.weight_quant(w)
    tiles = 2 + 0 + 1 + 2                             # the real token tiles of COUNTS (the rest is never read)
    for q, s in ((rows.q, rows.scale_inv), (tokens.q[:, : tiles * 128], tokens.scale_inv[:tiles]), (b.q, b.scale_inv)):
        assert torch.isfinite(q.float()).all() and (s > 0).all() and torch.isfinite(s).all()
    assert (rows.q[:5].float() == 0).all() and (rows.q[:, 128:256].float() == 0).all()
    assert (tokens.q[128:256, : tiles * 128].float() == 0).all()
    assert (b.q[0, :128, :128].float() == 0).all() and (b.q[1].float() == 0).all()


@pytest.mark.parametrize("k", [1, 3])
def test_act_quant_gathers_rows_as_it_loads_them(k):
    """With index, the kernel quantizes the rows x[index // k] (the MoE dispatch, fp8/linear.py): the same bytes
    and scales, both layouts, as quantizing a gathered copy."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor(COUNTS)
    index = torch.randperm(sum(COUNTS), generator=g)
    x = torch.randn(sum(COUNTS) // k + 1, 200, generator=g) * torch.logspace(-3, 2, sum(COUNTS) // k + 1)[:, None]
    got = fp8_quant.act_quant(x, counts, tokens=True, index=index, k=k)
    want = fp8_quant.act_quant(x[index // k], counts, tokens=True)
    tiles = 2 + 0 + 1 + 2   # the real token tiles of COUNTS (the rest is never written)
    for a, b in zip(got, want):
        if isinstance(a, fp8_quant.Tokens):
            a, b = (a.q[:, : tiles * 128], a.scale_inv[:tiles]), (b.q[:, : tiles * 128], b.scale_inv[:tiles])
        assert all(torch.equal(_bits(u) if u.dtype == torch.float8_e4m3fn else u,
                               _bits(v) if v.dtype == torch.float8_e4m3fn else v) for u, v in zip(a[:2], b[:2]))


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("counts", [[300], [170, 0, 1, 129]])
def test_triton_gemms_match_emulation_on_the_same_operands(counts, tma):
    """tma: the kernels' fp8 operands loaded through tensor descriptors (the configs' TMA)."""
    c = torch.tensor(counts, dtype=torch.int32)
    x, dy, w = torch.randn(300, 200), torch.randn(300, 130), torch.randn(len(counts), 130, 200)
    xr, xt = fp8_quant.act_quant(x, c, tokens=True)
    dyr, dyt = fp8_quant.act_quant(dy, c, tokens=True)
    b = fp8_quant.weight_quant(w)
    cfg = {"TMA": tma}
    pairs = [(fp8_gemm.gemm_rows(xr, b.q, b.scale_inv, 128, c, 130, torch.float32, cfg),     # fprop
              hopper._emulated_rows(xr, b.q, b.scale_inv, c, 130, torch.float32)),
             (fp8_gemm.gemm_rows(dyr, b.qt, b.scale_inv_t, 128, c, 200, torch.float32, cfg),  # dgrad
              hopper._emulated_rows(dyr, b.qt, b.scale_inv_t, c, 200, torch.float32)),
             (fp8_gemm.gemm_tokens(dyt, xt, torch.float32, cfg), hopper._emulated_tokens(dyt, xt, torch.float32))]
    for got, want in pairs:
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    if 0 in counts:
        assert (pairs[2][0][counts.index(0)] == 0).all()   # an expert without tokens gets a zero gradient


@pytest.mark.parametrize("K,blocks", [(200, False), (512, True)])
def test_scaled_mm_gets_weight_scales_in_a_layout_it_reads(K, blocks, monkeypatch):
    """cuBLAS reads 128×128 weight scales right only when K/128 is a multiple of 4 (fp8/paths.py): K = 512 gets
    them as blocks, K = 200 (2 K-blocks) as the same scales per 1×128 tile of each row of W, (K/128, N)."""
    seen = []

    def no_cublas(a, b, scale_a, scale_b, out_dtype):   # records what Fprop passes, then falls back to Triton
        seen.append(scale_b)
        raise RuntimeError("no cuBLAS on CPU")

    monkeypatch.setattr(torch, "_scaled_mm", no_cublas)
    x, w, dy = torch.randn(256, K).requires_grad_(), torch.randn(384, K).requires_grad_(), torch.randn(256, 384)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FP8Matmul.apply(x, w, None, hopper.HopperFP8(), torch.float32).backward(dy)
    blocks_t = fp8_quant.weight_quant(w.detach()).scale_inv.t()            # (K/128, N/128)
    want = blocks_t if blocks else blocks_t.repeat_interleave(128, 1)     # (K/128, N): each block's 128 rows of W
    assert torch.equal(seen[0], want) and (blocks or seen[0].is_contiguous())
    assert paths.used[("fprop", 384, K, 1, torch.float32)] == "triton"
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_compiled_block_traces_the_fp8_kernels():
    """The kernels are custom ops, so a block with FP8 layers compiles to one graph (fullgraph: no break), gives the
    eager result bit for bit when compiled without inductor, and runs under inductor, which checks that the real
    outputs have the shapes and strides the fake kernels declared."""
    from nanoseek.config import preset
    from nanoseek.fp8 import convert_to_fp8
    from nanoseek.model import DeepSeekV3

    torch.manual_seed(0)
    cfg = preset("tiny", num_nextn_predict_layers=0)
    model = convert_to_fp8(DeepSeekV3(cfg), emulate=False)   # the GPU code, here through the interpreter
    x = torch.randint(0, cfg.vocab_size, (2, 64))

    def loss_and_grads():
        model.zero_grad()
        out = model.loss(x, x, balance_alpha=1e-4)
        out.total.backward()
        return out.ce.item(), [p.grad.clone() for p in model.parameters()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # cuBLAS paths falling back on CPU
        want, want_grads = loss_and_grads()
        try:
            for backend in ("aot_eager", "inductor"):
                torch._dynamo.reset()
                for block in model.layers:
                    block.compile(fullgraph=True, backend=backend)
                got, grads = loss_and_grads()
                if backend == "aot_eager":
                    assert got == want and all(torch.equal(a, b) for a, b in zip(grads, want_grads))
                else:   # inductor's fp32 rounding moves FP8 roundings (and the interpreter rounds some wrongly)
                    assert got == pytest.approx(want, rel=1e-4)
        finally:
            torch._dynamo.reset()


def test_backward_keeps_fp8_operands_only():
    """What a layer keeps for backward: x only as its token-tiled FP8 copy and W only as Wᵀ's FP8 copy, with their
    scales (W's own FP8 copy is freed after Fprop)."""
    x, w = torch.randn(256, 384).requires_grad_(), torch.randn(512, 384).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = FP8Matmul.apply(x, w, None, hopper.HopperFP8(), torch.float32)
    saved = y.grad_fn.saved_tensors
    fp8 = [tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn]
    assert sorted(fp8) == sorted([(384, 256), (384, 512)])   # xᵀ token tiles (K, T·128) and Wᵀ (K, N)
    assert all(t.dtype in (torch.float8_e4m3fn, torch.float32, torch.int32) for t in saved)


_GLUON_PTX = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from nanoseek.kernels import fp8_gemm_sm90 as k
from nanoseek.kernels.fp8_quant import block_g
G, M, Np, Kp = 4, 1000, 256, 640
fp8 = dict(dtype=torch.float8_e4m3fn)
if sys.argv[1] == "rows":   # Fprop / Dgrad: A (M, Kp), B (G·Np, Kp), one scale per B block
    fn = k._gemm_rows_kernel
    rows = k.BLOCK_M
    ops = dict(a_desc=k._descriptor(torch.zeros(M, Kp, **fp8), rows), sa_ptr=torch.zeros(1),
               b_desc=k._descriptor(torch.zeros(G * Np, Kp, **fp8), k.BLOCK_N), sb_ptr=torch.zeros(1))
else:   # Wgrad: dyᵀ (Np, T·128), xᵀ (Kp, T·128), x's scales (T, Kp) per column through TMA
    fn = k._gemm_tokens_kernel
    rows = k.WGRAD_BLOCK_M
    ops = dict(a_desc=k._descriptor(torch.zeros(Np, 1024, **fp8), rows), sa_ptr=torch.zeros(1),
               b_desc=k._descriptor(torch.zeros(Kp, 1024, **fp8), k.BLOCK_N),
               sb_desc=k.TensorDescriptor.from_tensor(torch.zeros(8, Kp), [1, k.BLOCK_N], k.SCALES_LAYOUT.value))
ops.update(c_ptr=torch.zeros(1, dtype=torch.bfloat16), counts_ptr=torch.zeros(1, dtype=torch.int32))
names = list(fn.arg_names)
const = dict(BLOCK_G=block_g(G), STAGES=3, num_warps=k.warps_for(rows))
signature = {n: mangle_type(ops[n]) if n in ops else "constexpr" if n in const else "i32" for n in names}
src = GluonASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in const.items()})
options = dict(num_warps=k.warps_for(rows))
sys.stdout.write(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


@pytest.mark.parametrize("kernel", ["rows", "tokens"])
def test_gluon_grouped_gemm_compiles_for_sm90_with_overlapped_products(kernel):
    """The Gluon kernels (kernels/fp8_gemm_sm90.py: Fprop / Dgrad over rows, Wgrad over tokens) have no interpreter:
    compile them for sm90 here, where there is no GPU (in a process without TRITON_INTERPRET, which would turn
    their helpers into interpreted functions), and check the schedule that makes them fast in their PTX: FP8
    wgmma, waits that leave the next block's product in flight (`wait_group 1`) around the promotions, and none of
    the register copies of a product in flight that make ptxas serialize the wgmmas. Their numbers are checked on
    the GPU (tests/test_fp8_gpu.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _GLUON_PTX, kernel], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = run.stdout
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in ptx
    waits = [i for i in range(len(ptx)) if ptx.startswith("wgmma.wait_group.sync.aligned 1;", i)]
    assert len(waits) >= 4
    # between a wait that hands back one product and the next wgmma issue: the promotion's FMAs, no register copies
    issue = ptx.index("wgmma.fence", waits[0])
    assert "fma.rn.f32" in ptx[waits[0]:issue] and "mov.b32" not in ptx[waits[0]:issue]
