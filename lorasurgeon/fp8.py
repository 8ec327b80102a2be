"""FP8 e4m3 block quantization, the format DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8 ship: pure maths, torch only.

A weight W (..., m, n) is stored as q = `weight` (float8_e4m3fn) and s = `weight_scale_inv` (fp32) with one
scale per (bm, bn) block, grid (..., ⌈m/bm⌉, ⌈n/bn⌉); the last row/column of blocks may be partial.

- Dequantize: W = q · s, in fp32 (the scale multiplies despite its name). This is DeepSeek-V3's
  `inference/kernel.py::weight_dequant` and transformers' `Fp8Dequantize` bit for bit.
- Quantize, per block: amax = max |W_blk| over the block's real elements (a partial block counts as zero
  padded, as DeepSeek's README_WEIGHTS.md says), s = amax / 448 in fp32, q = RNE(clamp(W_blk / s, ±448))
  with the division in fp32. This is DeepSeek's `act_quant` formula (`s = amax / 448; y = x / s`), applied
  per 2-D block as its weights are; torch's fp32 → e4m3 cast rounds to nearest even. The clamp only catches
  fp32 rounding at the block maximum; it also keeps the result independent of how a torch version casts
  values past 448 (torch 2.13 saturates, some earlier versions gave NaN).
  transformers' `Fp8Quantize` multiplies by fl(448 / amax) instead and stores fl(1 / fl(448 / amax)), which
  differs from this in the last fp32 bit of some scales and, rarely, by one fp8 step.
- An all-zero block gets s = 1 (transformers' choice; DeepSeek's formula divides 0 by 0 there).
- `power_of_two` scales (config `scale_fmt: "ue8m0"`, DeepSeek-V3.1) are s = 2^⌈log2(amax / 448)⌉, as both
  DeepSeek's `act_quant` and transformers round them.

The merge (`merge_fp8_block`) keeps a block's stored scale where that stores W + ΔW closer than a fresh one:
re-rounding a whole block onto a fresh grid adds noise of the order of the fp8 step, which for a small ΔW
is larger than ΔW itself. Inputs must be finite; a non-finite value makes its block's scale non-finite,
which `Fp8Merge.finite` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Elements of W merged at a time (whole block rows): 16 MB of fp32 per temporary, a few of them at once.
CHUNK_ELEMENTS = 1 << 22
DeltaRows = Callable[[int, int, int], torch.Tensor]  # (matrix, first row, end row) -> fp32 rows of ΔW


@dataclass(frozen=True)
class Fp8Merge:
    """W + ΔW stored back in the block format, and how much of ΔW the stored weights carry.

    With D = deq(q, s) − deq(q_old, s_old), the change the stored weights actually carry:
    - `survival` = ‖D‖ / ‖ΔW‖ (ANCHORS-2 Appendix A). It is not a fraction: where ΔW is far below the fp8
      step it tends to 0 (ΔW lost), but rounding noise alone can push it to 1 or past it.
    - `error` = ‖D − ΔW‖ / ‖ΔW‖: 0 when ΔW is stored exactly, about 1 when the merge is no better than not
      merging at all. The figure to flag on.
    For ΔW = 0 both are 1 and 0 when nothing changed, and inf when re-quantizing alone changed the weights.
    `rescaled` counts the blocks that took a fresh scale; `finite` is False when W + ΔW was not.
    """

    q: torch.Tensor
    scale_inv: torch.Tensor
    survival: float
    error: float
    rescaled: int
    finite: bool


def grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight of `shape` (..., m, n): (..., ⌈m/bm⌉, ⌈n/bn⌉)."""
    *lead, m, n = shape
    return (*lead, -(-m // block[0]), -(-n // block[1]))


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 q · s, each block by its scale. `scale_inv` may have any shape holding the grid's elements
    (a per-tensor scale of shape () with block (m, n), a per-channel one (m, 1) with block (1, n))."""
    shape = tuple(q.shape)
    grid = grid_shape(shape, block)
    blocks = _blocks(q.to(torch.float32, copy=True), block)  # (..., sm, bm, sn, bn), ours to scale in place
    blocks.mul_(scale_inv.to(torch.float32).reshape(grid)[..., :, None, :, None])
    return _unblocks(blocks, shape)


def quantize_blocks(
    w: torch.Tensor,
    block: tuple[int, int],
    power_of_two: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    scale_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) for fp32 `w` (..., m, n): q float8_e4m3fn like w, s (..., ⌈m/bm⌉, ⌈n/bn⌉) in `scale_dtype`, each
    block's fresh scale (module docstring) rounded to `scale_dtype` before w is divided by it; or, given
    `scale_inv` (grid shaped), q on those scales, values past ±448 · s clipped."""
    shape = tuple(w.shape)
    blocks = _blocks(w.to(torch.float32), block)  # (..., sm, bm, sn, bn); partial blocks zero padded
    scale = _fresh_scale(blocks, power_of_two, scale_dtype) if scale_inv is None else scale_inv
    scaled = (blocks / scale.to(torch.float32)[..., :, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    return _unblocks(scaled, shape).to(E4M3), scale


def merge_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    delta: torch.Tensor | DeltaRows,
    block: tuple[int, int],
    power_of_two: bool = False,
) -> Fp8Merge:
    """W + ΔW in the stored layout, W = deq(q, s): q' float8_e4m3fn shaped like q, s' shaped and typed like
    `scale_inv`. `delta` is fp32 ΔW shaped like q (not modified), or a function giving its rows
    `delta(e, start, stop)` of matrix e of a stacked (E, m, n) weight (0 for a matrix), so that ΔW of a large
    weight is never whole in memory.

    Each block keeps its stored scale, or takes the fresh one (amax / 448 of W + ΔW), whichever stores its
    W + ΔW closer (squared error; the stored scale on ties, so a block ΔW does not move keeps its bytes).
    A fresh scale alone re-rounds every element onto a new grid; keeping the old one alone clips what ΔW
    pushes past ±448 · s. Worked a block-row chunk at a time, so temporaries stay small.

    >>> q, s = quantize_blocks(torch.randn(256, 256), (128, 128))
    >>> merged = merge_fp8_block(q, s, torch.full((256, 256), 0.5), (128, 128))
    >>> merged.q.dtype, tuple(merged.scale_inv.shape), merged.error < 0.2
    (torch.float8_e4m3fn, (2, 2), True)
    """
    *_, m, n = q.shape
    grid = grid_shape(tuple(q.shape), block)
    qs = q.reshape(-1, m, n)
    rows_of = delta if callable(delta) else _rows_of(delta.reshape(-1, m, n))
    ss = scale_inv.reshape(-1, grid[-2], grid[-1])
    out_q, out_s = torch.empty_like(qs), torch.empty_like(ss)
    rows = max(1, CHUNK_ELEMENTS // (block[0] * n)) * block[0]
    totals = torch.zeros(4, dtype=torch.float64, device=q.device)  # ‖ΔW‖², ‖D‖², ‖D − ΔW‖², fresh blocks
    finite = True
    for e in range(qs.shape[0]):
        for start in range(0, m, rows):
            cells = slice(start // block[0], -(-min(start + rows, m) // block[0]))
            part = slice(start, start + rows)
            out_q[e, part], out_s[e, cells], sums = _merge_rows(
                qs[e, part], ss[e, cells], rows_of(e, start, min(start + rows, m)), block, power_of_two
            )
            totals += sums
            finite = finite and bool(torch.isfinite(out_s[e, cells]).all())
    wanted, got, missed, rescaled = totals.tolist()
    if wanted == 0:
        survival, error = (1.0, 0.0) if got == 0 else (math.inf, math.inf)
    else:
        survival, error = math.sqrt(got / wanted), math.sqrt(missed / wanted)
    return Fp8Merge(out_q.reshape(q.shape), out_s.reshape(scale_inv.shape), survival, error, int(rescaled), finite)


def _rows_of(deltas: torch.Tensor) -> DeltaRows:
    return lambda e, start, stop: deltas[e, start:stop]


def _merge_rows(
    q: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor, block: tuple[int, int], power_of_two: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of whole block rows: (q', s', [‖ΔW‖², ‖D‖², ‖D − ΔW‖², blocks rescaled])."""
    base = dequantize_blocks(q, scale, block)
    target = base + delta  # (rows, n) fp32
    candidates = []
    for given in (scale, None):  # the stored scale first: it wins ties
        cq, cs = quantize_blocks(target, block, power_of_two, scale.dtype, given)
        stored = dequantize_blocks(cq, cs, block)
        miss = torch.linalg.vector_norm(_blocks(stored - target, block), dim=(-3, -1)).square()  # (sm, sn)
        candidates.append((cq, cs, stored, miss))
    (kq, ks, kd, kmiss), (fq, fs, fd, fmiss) = candidates
    keep = kmiss <= fmiss  # (sm, sn); NaN (non-finite W + ΔW) takes the fresh scale, which shows it
    if bool(keep.all()) or not bool(keep.any()):  # one policy everywhere (the common case): no blending
        chosen_q, chosen_s, change = (kq, ks, kd) if bool(keep.all()) else (fq, fs, fd)
        change = change.sub_(base)
    else:
        spread = _unblocks(
            keep[:, None, :, None].expand(*keep.shape[:1], block[0], keep.shape[1], block[1]), tuple(q.shape)
        )
        chosen_q, chosen_s = torch.where(spread, kq, fq), torch.where(keep, ks, fs)
        change = torch.where(spread, kd, fd).sub_(base)  # D
    sums = torch.stack([_square(delta), _square(change), _square(change.sub_(delta)), (~keep).sum().double()])
    return chosen_q, chosen_s, sums


def dequantized(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], delta: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """deq(q, s) (+ ΔW) rounded once to `dtype`: the `--dtype bf16` route, which leaves the block format.

    Without ΔW, bf16 output equals transformers' dequantized loading (`dequantize=True`) bit for bit.
    """
    exact = dequantize_blocks(q, scale_inv, block)
    if delta is not None:
        exact.add_(delta)
    return exact.to(dtype)


def _square(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² as an fp64 scalar; the norm in fp32 (torch sums it in a cascade, good to ~1e-6 relative): a reported
    ratio needs no more, and an fp64 norm costs 6x."""
    norm: torch.Tensor = torch.linalg.vector_norm(x)
    return norm.double().square()


def _fresh_scale(blocks: torch.Tensor, power_of_two: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 per block of (..., sm, bm, sn, bn) `blocks` (2^⌈log2⌉ of it for ue8m0), in `scale_dtype`;
    1 for an all-zero block (or one whose scale underflows), where q is 0 whatever s is."""
    scale = blocks.abs().amax(dim=(-3, -1)) / E4M3_MAX  # (..., sm, sn)
    if power_of_two:
        scale = _ceil_power_of_two(scale)
    scale = scale.to(scale_dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(..., m, n) -> (..., sm, bm, sn, bn), zero padded to whole blocks (a view when none is needed)."""
    *lead, m, n = x.shape
    bm, bn = block
    sm, sn = -(-m // bm), -(-n // bn)
    if (sm * bm, sn * bn) != (m, n):
        x = F.pad(x, (0, sn * bn - n, 0, sm * bm - m))
    return x.reshape(*lead, sm, bm, sn, bn)


def _unblocks(blocks: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `_blocks`: back to `shape`, padding dropped (contiguous)."""
    *lead, sm, bm, sn, bn = blocks.shape
    whole = blocks.reshape(*lead, sm * bm, sn * bn)
    m, n = shape[-2:]
    return whole if whole.shape[-2:] == (m, n) else whole[..., :m, :n].contiguous()


def _ceil_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """2^⌈log2 x⌉ for x > 0, exactly (frexp, not a rounded log2); 0 stays 0."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa · 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # an exact power of two is its own ceiling
    return torch.where(x > 0, torch.ldexp(torch.ones_like(x), exponent), x)
