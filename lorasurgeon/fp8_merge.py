"""W + ΔW stored back in the FP8 block format (lorasurgeon.fp8 holds the format's maths): pure maths, torch only.

Each block keeps its stored scale, or takes the fresh one (amax / 448 of W + ΔW), whichever stores its W + ΔW
closer (squared error; the stored scale on ties, so a block ΔW does not move keeps its bytes). Re-rounding a
whole block onto a fresh grid adds noise of the order of the fp8 step, which for a small ΔW is larger than ΔW
itself; keeping the stored scale alone clips what ΔW pushes past ±448 · s. Inputs must be finite; a non-finite
value makes its block's scale non-finite, which `Fp8Merge.finite` reports.

Re-quantizing both ways and measuring what ΔW keeps takes some forty passes over each element, so the work goes
a chunk of whole blocks at a time (a band of block rows, a run of block columns: CHUNK_ELEMENTS) through
buffers made once per weight (`_Buffers`): the passes over a chunk then run from the cache, and no temporary is
allocated (on CPU a fresh one costs a page fault per 4 KB, as much as the pass). A per-tensor scale (one block)
is one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from lorasurgeon.fp8 import E4M3, dequantize_into, fresh_scale, grid_shape, quantize_into

# Elements of W merged at a time (whole blocks): 4 MB per fp32 buffer, six of them, so that the forty-odd passes
# over a chunk run from the cache (measured on the 2-core VM: 2^20 beat 2^18 and 2^22).
CHUNK_ELEMENTS = 1 << 20
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

    >>> from lorasurgeon.fp8 import quantize_blocks
    >>> q, s = quantize_blocks(torch.randn(256, 256), (128, 128))
    >>> merged = merge_fp8_block(q, s, torch.full((256, 256), 0.5), (128, 128))
    >>> merged.q.dtype, tuple(merged.scale_inv.shape), merged.error < 0.2
    (torch.float8_e4m3fn, (2, 2), True)
    """
    *_, m, n = q.shape
    (bm, bn), grid = block, grid_shape(tuple(q.shape), block)
    codes = q.reshape(-1, m, n).view(torch.uint8)
    rows_of = delta if callable(delta) else _rows_of(delta.reshape(-1, m, n))
    scales = scale_inv.reshape(-1, grid[-2], grid[-1])
    out_q, out_s = torch.empty_like(codes), torch.empty_like(scales)
    cols = min(grid[-1], max(1, CHUNK_ELEMENTS // (bm * bn))) * bn  # a chunk: whole blocks, ~CHUNK_ELEMENTS
    rows = min(grid[-2], max(1, CHUNK_ELEMENTS // (bm * cols))) * bm
    buffers = _Buffers.of(rows, cols, q.device)
    totals = [0.0] * 4  # ‖ΔW‖², ‖D‖², ‖D − ΔW‖², fresh blocks
    for e in range(codes.shape[0]):
        for top in range(0, m, rows):
            bottom = min(top + rows, m)
            delta_rows = rows_of(e, top, bottom)
            for left in range(0, n, cols):
                right = min(left + cols, n)
                cells = (e, slice(top // bm, -(-bottom // bm)), slice(left // bn, -(-right // bn)))
                merged, out_s[cells], sums = _merge_chunk(
                    codes[e, top:bottom, left:right], scales[cells], delta_rows[:, left:right], block, power_of_two,
                    buffers,
                )  # fmt: skip
                out_q[e, top:bottom, left:right] = merged[: bottom - top, : right - left]
                totals = [t + u for t, u in zip(totals, sums, strict=True)]
    wanted, got, missed, rescaled = totals
    if wanted == 0:
        survival, error = (1.0, 0.0) if got == 0 else (math.inf, math.inf)
    else:
        survival, error = math.sqrt(got / wanted), math.sqrt(missed / wanted)
    finite = bool(torch.isfinite(out_s).all())
    return Fp8Merge(out_q.view(E4M3).reshape(q.shape), out_s.reshape(scale_inv.shape), survival, error,
                    int(rescaled), finite)  # fmt: skip


@dataclass(frozen=True)
class _Buffers:
    """A chunk's work, padded to whole blocks: fp32 W, W + ΔW, the two candidates' stored values, a
    scratch and ΔW (when it needs padding); uint8 input codes (likewise) and the two candidates' codes; an
    int16 scratch for lorasurgeon.fp8.dequantize_into."""

    base: torch.Tensor
    target: torch.Tensor
    kept: torch.Tensor
    fresh: torch.Tensor
    scratch: torch.Tensor
    delta: torch.Tensor
    codes: torch.Tensor
    kept_codes: torch.Tensor
    fresh_codes: torch.Tensor
    bits: torch.Tensor

    @classmethod
    def of(cls, rows: int, n: int, device: torch.device) -> _Buffers:
        dtypes = [torch.float32] * 6 + [torch.uint8] * 3 + [torch.int16]
        return cls(*(torch.empty(rows, n, dtype=dtype, device=device) for dtype in dtypes))

    def first(self, rows: int, cols: int) -> _Buffers:
        """The buffers' first rows × cols elements, as contiguous rows × cols tensors."""
        return _Buffers(*(getattr(self, f.name).view(-1)[: rows * cols].view(rows, cols) for f in fields(self)))


def _rows_of(deltas: torch.Tensor) -> DeltaRows:
    return lambda e, start, stop: deltas[e, start:stop]


def _merge_chunk(
    codes: torch.Tensor,
    scale: torch.Tensor,
    delta: torch.Tensor,
    block: tuple[int, int],
    power_of_two: bool,
    buffers: _Buffers,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One chunk of blocks (uint8 codes, r × n, and ΔW; views): (the merged codes padded to whole blocks, a
    view of a buffer; s'; [‖ΔW‖², ‖D‖², ‖D − ΔW‖², blocks rescaled]). Padding is code 0 and ΔW 0, so it stores
    exactly and adds nothing to a block's amax or error."""
    (r, n), (sm, sn) = codes.shape, scale.shape
    work = buffers.first(sm * block[0], sn * block[1])
    if work.codes.shape != codes.shape:
        work.codes.zero_()[:r, :n] = codes
        work.delta.zero_()[:r, :n] = delta
        codes, delta = work.codes, work.delta
    s = scale.to(torch.float32)
    dequantize_into(work.base, codes, s, block, work.bits)
    torch.add(work.base, delta, out=work.target)
    kept_miss = _candidate(work, s, work.kept_codes, work.kept, block)
    new_scale = fresh_scale(_block_amax(work, block), power_of_two, scale.dtype)
    fresh_miss = _candidate(work, new_scale.to(torch.float32), work.fresh_codes, work.fresh, block)
    keep = kept_miss <= fresh_miss  # (sm, sn); NaN (non-finite W + ΔW) takes the fresh scale, which shows it
    kept = int(keep.sum())
    if kept in (0, keep.numel()):  # one policy everywhere (the common case): no blending
        chosen_codes, chosen_scale, stored = (
            (work.kept_codes, scale, work.kept) if kept else (work.fresh_codes, new_scale, work.fresh)
        )
    else:  # each block from its candidate, written over the fresh one
        mask, (bm, bn) = keep[:, None, :, None], block
        for source, into in ((work.kept_codes, work.fresh_codes), (work.kept, work.fresh)):
            target = into.view(sm, bm, sn, bn)
            torch.where(mask, source.view(sm, bm, sn, bn), target, out=target)
        chosen_codes, chosen_scale, stored = work.fresh_codes, torch.where(keep, scale, new_scale), work.fresh
    change = torch.sub(stored, work.base, out=work.scratch)  # D
    got = _square(change)
    missed = _square(change.sub_(delta))  # not ‖stored − (W + ΔW)‖², which rounds W + ΔW
    return chosen_codes, chosen_scale, [_square(delta), got, missed, keep.numel() - kept]


def _candidate(
    work: _Buffers, scale: torch.Tensor, codes: torch.Tensor, stored: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """W + ΔW quantized on `scale` into `codes`, its dequantized values into `stored`; returns each block's
    squared error ‖stored − (W + ΔW)‖² (fp32, grid shaped). The codes need no NaN check (dequantize_into): they
    hold one only where W + ΔW is not finite, and then the block's fresh scale is not finite and wins."""
    (rows, n), (bm, bn) = work.target.shape, block
    quantize_into(codes, stored, work.target, scale, block)
    dequantize_into(stored, codes, scale, block, work.bits, checked=False)
    error = torch.sub(stored, work.target, out=work.scratch).view(rows, n // bn, bn)
    squares: torch.Tensor = torch.linalg.vector_norm(error, dim=-1).square_().view(rows // bm, bm, n // bn).sum(1)
    return squares


def _square(x: torch.Tensor) -> float:
    """‖x‖² in fp64 from its fp32 norm (torch sums it in a cascade, good to ~1e-7 relative: a reported ratio needs
    no more, and an fp64 norm costs 6 ×)."""
    return float(torch.linalg.vector_norm(x)) ** 2


def _block_amax(work: _Buffers, block: tuple[int, int]) -> torch.Tensor:
    """max |W + ΔW| per (bm, bn) block (grid shaped, fp32; NaN where a block holds one)."""
    (rows, n), (bm, bn) = work.target.shape, block
    segments = torch.abs(work.target, out=work.scratch).view(rows, n // bn, bn)
    amax: torch.Tensor = segments.amax(dim=-1).view(rows // bm, bm, n // bn).amax(dim=1)
    return amax
