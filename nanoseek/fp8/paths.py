"""Which path runs each FP8 GEMM of fp8/hopper.py, in plain Python (no Triton), so that the CPU tests cover it.

A GEMM has paths in order of preference, the last one the emulation. The first path that runs for a shape is
checked once against the emulation (relative Frobenius norm); one that raises or disagrees is dropped for that
shape with a one-time warning, so one odd layer does not slow the others.
"""
from __future__ import annotations

import warnings

import torch

_failed: set[tuple] = set()
_verified: set[tuple] = set()
used: dict[tuple, str] = {}   # (GEMM, shape) -> the path that ran last: what a benchmark reports
# bf16 output rounding and summation order give ~4e-3; a misread scale layout gives O(1) or worse
VERIFY_TOL = 2e-2


def scaled_mm_reads(b_scale: torch.Tensor) -> bool:
    """Whether `torch._scaled_mm` reads 128×128 block scales (…, Nt, Kt) the way they are stored (row-major).

    cuBLAS reads the rows of such a scale tensor Kt rounded up to 4 floats apart, while torch 2.11's `_scaled_mm`
    accepts only a row stride of exactly Kt (the rule that would add the padding, pytorch/pytorch#166752, is not in
    it): with Kt % 4 != 0 and more than one row it rejects padded rows ("Invalid scaling configuration", H200) and
    misreads unpadded ones (H100: relative error 1.7e5 at Kt = 2). Such shapes pass their scales as 1×128 tiles
    instead (fp8/hopper.py)."""
    return b_scale.shape[-2] == 1 or b_scale.shape[-1] % 4 == 0


def _reject(key: tuple, name: str, why: str) -> None:
    _failed.add((key, name))
    warnings.warn(f"FP8 {key[0]} {key[1:]}: {name} failed, falling back for this shape ({why})", stacklevel=4)


def first_that_runs(key: tuple, paths):
    """Run the first of (name, fn) that works for this key; the last one (the emulation) must not fail.
    A path's first result for a shape is checked against the emulation, so a layout that a library accepts but
    reads differently falls back instead of training on garbage."""
    *tries, (last_name, last) = paths
    for name, fn in tries:
        if (key, name) in _failed:
            continue
        try:
            out = fn()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a rejected layout (RuntimeError), a Triton compile error, ...: fall back
            _reject(key, name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if (key, name) not in _verified:
            # once per shape, whatever the inputs: entries that a NaN or inf in the inputs makes non-finite in the
            # emulation judge nothing and are left out, the rest judge the layout (retrying until a call had no
            # such entry ran the emulation on every call once a NaN appeared)
            want = last().float()
            ok = torch.isfinite(want)
            diff = torch.where(ok, out.float() - want, 0).norm()
            err = (diff / torch.where(ok, want, 0).norm().clamp_min(1e-30)).item()
            if not err <= VERIFY_TOL:
                _reject(key, name, f"relative error {err:.2e} against the emulation")
                continue
            _verified.add((key, name))
        used[key] = name
        return out
    used[key] = last_name
    return last()
