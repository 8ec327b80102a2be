"""The FP8 block merge's CPU route (lorasurgeon.fp8_merge states the policy): two loops compiled by numba, and
`merge_bands`, which runs them a band of block rows at a time on every core.

As torch operations the merge makes some forty passes over every element (decode, add, two re-quantizations,
their errors, the block maxima, the figures), each a trip through memory; here it makes two, each element's
work done in registers, 8 or 16 lanes at a time (see _wide_vectors). The loops take a band of whole block
rows of one matrix (its last block row or column may be partial): `codes` uint8 (r, n), `scale` fp32
(⌈r/bm⌉, ⌈n/bn⌉), `delta` fp32 ΔW (r, n), all C-contiguous numpy arrays.

The arithmetic is the torch route's, operation for operation, in fp32 (lorasurgeon.fp8 states the format):
W = e4m3(c) · s, T = W + ΔW, a candidate's codes RNE(clamp(T / s', ±448)) on its scale s', its change
D = e4m3(c') · s' − W. A block's sums of squares are accumulated per column in fp32, then summed across its
columns, so they depend on nothing outside the block (not on the band, nor on the number of threads). e4m3 codes
are decoded and rounded by integer arithmetic on fp32 bit patterns, exactly as torch's casts do
(tests/test_fp8_kernel.py checks both against them, and the whole merge against the torch route).

The loops are compiled on first use (about 10 s on the 2-core VM) into numba's cache (`__pycache__` beside this
file, or numba's user cache directory), and loaded from it afterwards (about 0.4 s).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import numba
import numpy as np
import torch

from lorasurgeon.devices import torch_threads
from lorasurgeon.fp8 import BlockSums, DeltaRows, fresh_scale


def _wide_vectors() -> None:
    """Let LLVM vectorize 16 fp32 lanes at a time where the CPU has AVX-512: for CPUs that have it, LLVM prefers
    256-bit vectors by default, and the 512-bit loops ran about 1.3 x faster on the 2-core VM (the results are
    the same bits: every lane computes alone). numba's setting is the process's, so this is done only while no
    one has set it (NUMBA_CPU_FEATURES / NUMBA_CPU_NAME) and before numba has compiled anything; other numba code
    in the process then gets the wider vectors too, and compiles once more into its cache."""
    from numba.core import codegen, registry
    from numba.core import config as numba_config

    config: Any = numba_config  # its settings are set at run time, out of mypy's sight
    if (
        config.CPU_FEATURES is not None
        or config.CPU_NAME is not None
        or "_toplevel_target_context" in vars(registry.cpu_target)
    ):
        return
    features: str = codegen.get_host_cpu_features()  # type: ignore[no-untyped-call]
    if "+avx512f" in features.split(","):
        config.CPU_FEATURES = features + ",-prefer-256-bit"


_wide_vectors()
_F = np.float32
# numba computes int32 op int32 in int64 (and then in 4-lane vectors, not 8): every integer result is cut back
_I = np.int32
_INLINE = numba.njit(inline="always")


def _loop(fn: Any) -> Any:
    """`fn` compiled, without the GIL and without Python's checks on division: into numba's cache where it has
    a writable directory, else afresh in each process."""
    try:
        return numba.njit(nogil=True, cache=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available" (a read-only install, no home)
        return numba.njit(nogil=True, error_model="numpy")(fn)


@_INLINE
def _decode(code: Any) -> Any:
    """The e4m3 value of a uint8 code, in fp32. A normal code's exponent and mantissa move up 20 bits and its
    exponent gains 120 (fp32's bias 127 less e4m3's 7); a subnormal one (exponent 0) is its mantissa · 2^-9;
    0x7F and 0xFF are NaN."""
    c = _I(code)
    magnitude = _I(c & _I(0x7F))
    normal = _I(_I(magnitude << _I(20)) + _I(0x3C000000)).view(np.float32)
    value = normal if magnitude >= _I(8) else _F(magnitude) * _F(2.0**-9)
    value = -value if c >= _I(0x80) else value
    return _F(np.nan) if magnitude == _I(0x7F) else value


@_INLINE
def _quantize(x: Any) -> Any:
    """(code, its e4m3 value in fp32) of RNE(clamp(x, ±448)) for fp32 x, as torch's fp32 → e4m3 cast gives it
    (−0 keeps its sign; NaN is 0x7F). From 2^-6 up (normal e4m3) the fp32 pattern is rounded to 3 mantissa bits
    by adding 0x7FFFF plus the lowest kept bit (ties to even), on the signed pattern (the carry stops short of
    the sign, |x| being at most 448); below, x · 2^9 is rounded to an integer."""
    nan = x != x
    x = min(max(x, _F(-448.0)), _F(448.0))
    bits = _F(x).view(np.int32)
    sign = _I(_I(bits >> _I(24)) & _I(0x80))
    rounded = _I(_I(bits + _I(0x7FFFF)) + _I(_I(bits >> _I(20)) & _I(1))) & _I(-0x100000)
    steps = np.rint(x * _F(512.0))
    normal = _I(bits & _I(0x7FFFFFFF)) >= _I(0x3C800000)
    code = _I(_I(_I(rounded >> _I(20)) & _I(0x7FF)) - _I(960)) if normal else _I(abs(steps))
    value = _I(rounded).view(np.float32) if normal else steps * _F(2.0**-9)
    return np.uint8(0x7F if nan else _I(code | sign)), value


@_loop
def block_amax(codes: Any, scale: Any, delta: Any, bm: int, bn: int, amax: Any, wanted: Any) -> None:
    """Per block into `amax` and `wanted` (fp32, grid shaped): max |W + ΔW| (NaN where one is NaN), and Σ ΔW²."""
    rows, n = codes.shape
    peak = np.empty((scale.shape[1], bn), _F)
    nan = np.empty((scale.shape[1], bn), np.int32)
    square = np.empty((scale.shape[1], bn), _F)
    for bi in range(scale.shape[0]):
        peak[:] = 0
        nan[:] = 0
        square[:] = 0
        for i in range(bi * bm, min(rows, bi * bm + bm)):
            for bj in range(scale.shape[1]):
                left, s = bj * bn, scale[bi, bj]
                for k in range(min(bn, n - left)):
                    d = delta[i, left + k]
                    t = abs(_decode(codes[i, left + k]) * s + d)
                    peak[bj, k] = t if t > peak[bj, k] else peak[bj, k]
                    nan[bj, k] |= t != t
                    square[bj, k] += d * d
        for bj in range(scale.shape[1]):
            amax[bi, bj] = np.nan if nan[bj].any() else peak[bj].max()
            wanted[bi, bj] = square[bj].sum()


@_loop
def merge_blocks(
    codes: Any, scale: Any, fresh: Any, delta: Any, bm: int, bn: int, out: Any, keep: Any, sums: Any
) -> None:
    """W + ΔW on each block's stored scale (`scale`) or its fresh one (`fresh`, fp32), whichever stores it closer:
    ‖D − ΔW‖² the smaller, the stored scale on ties. Writes the chosen codes into `out` (uint8 like `codes`),
    `keep` (bool, grid shaped: the stored scale won) and `sums` (fp32, grid × 2: the winner's ‖D‖², ‖D − ΔW‖²)."""
    rows, n = codes.shape
    spare = np.empty_like(out)  # the fresh candidate's codes, copied over `out` where it wins
    acc = np.empty((4, scale.shape[1], bn), _F)  # ‖D‖², ‖D − ΔW‖² on the stored scale, then on the fresh one
    for bi in range(scale.shape[0]):
        acc[:] = 0
        top, bottom = bi * bm, min(rows, bi * bm + bm)
        for i in range(top, bottom):
            for bj in range(scale.shape[1]):
                left, s, f = bj * bn, scale[bi, bj], fresh[bi, bj]
                for k in range(min(bn, n - left)):
                    d = delta[i, left + k]
                    w = _decode(codes[i, left + k]) * s
                    t = w + d
                    out[i, left + k], kept = _quantize(t / s)
                    spare[i, left + k], new = _quantize(t / f)
                    change, other = kept * s - w, new * f - w
                    acc[0, bj, k] += change * change
                    acc[1, bj, k] += (change - d) * (change - d)
                    acc[2, bj, k] += other * other
                    acc[3, bj, k] += (other - d) * (other - d)
        for bj in range(scale.shape[1]):
            stored, rescaled = acc[1, bj].sum(), acc[3, bj].sum()
            keep[bi, bj] = stored <= rescaled
            sums[bi, bj, 0] = acc[0, bj].sum() if keep[bi, bj] else acc[2, bj].sum()
            sums[bi, bj, 1] = stored if keep[bi, bj] else rescaled
            if not keep[bi, bj]:
                out[top:bottom, bj * bn : bj * bn + bn] = spare[top:bottom, bj * bn : bj * bn + bn]


def merge_bands(
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows_of: DeltaRows,
    block: tuple[int, int],
    power_of_two: bool,
    out_q: torch.Tensor,
    out_s: torch.Tensor,
    elements: int,
) -> Iterator[BlockSums]:
    """The merge of stacked matrices (`codes` uint8 (E, m, n), `scales` (E, ⌈m/bm⌉, ⌈n/bn⌉) in their stored
    dtype; `rows_of(e, top, bottom)` gives fp32 rows of matrix e's ΔW) into `out_q` and `out_s`, a band of
    whole block rows (about `elements`) per task on as many threads as torch has, each band's figures in band
    order. A task computes its band's ΔW itself (so `rows_of` must be safe to call from several threads), with
    torch on one thread: its idle threads would spin on the cores the loops need."""
    (_, m, n), bm = codes.shape, block[0]
    rows = bm * max(1, elements // (bm * n))
    workers = torch.get_num_threads()

    def band_delta(e: int, top: int, bottom: int) -> torch.Tensor:
        return rows_of(e, top, bottom).contiguous()

    pool, pending = _pool(workers), deque[Future[BlockSums]]()
    try:
        with torch_threads(1):
            for e in range(codes.shape[0]):
                for top in range(0, m, rows):
                    bottom = min(top + rows, m)
                    cells = (e, slice(top // bm, -(-bottom // bm)))
                    band = (codes[e, top:bottom], scales[cells], partial(band_delta, e, top, bottom))
                    pending.append(pool.submit(_band, *band, out_q[e, top:bottom], out_s[cells], block, power_of_two))
                    if len(pending) > workers:  # one band waiting per thread at most: memory stays a few bands
                        yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:  # on an error, no band outlives the merge
        for future in pending:
            future.cancel()
        wait(pending)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """The threads that run the bands, kept from one weight to the next (a merge has thousands of weights)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="lorasurgeon-fp8")
    return _POOLS[workers]


def _band(
    codes: torch.Tensor,
    scale: torch.Tensor,
    delta_of: Callable[[], torch.Tensor],
    out_codes: torch.Tensor,
    out_scale: torch.Tensor,
    block: tuple[int, int],
    power_of_two: bool,
) -> BlockSums:
    """One band (`delta_of()` gives its ΔW), its codes and scales written into the outputs."""
    delta, s = delta_of().numpy(), scale.to(torch.float32)
    amax, wanted = torch.empty_like(s), torch.empty_like(s)
    block_amax(codes.numpy(), s.numpy(), delta, *block, amax.numpy(), wanted.numpy())
    new_scale = fresh_scale(amax, power_of_two, scale.dtype)
    keep, sums = torch.empty(s.shape, dtype=torch.bool), torch.empty(*s.shape, 2)
    fresh = new_scale.to(torch.float32).contiguous()
    merge_blocks(codes.numpy(), s.numpy(), fresh.numpy(), delta, *block, out_codes.numpy(), keep.numpy(), sums.numpy())
    out_scale.copy_(torch.where(keep, scale, new_scale))
    total = sums.double().sum(dim=(0, 1))
    finite = bool(torch.isfinite(amax).all())
    return float(wanted.double().sum()), float(total[0]), float(total[1]), int((~keep).sum()), finite
