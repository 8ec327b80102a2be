"""W + ΔW stored back in the FP8 block format (lorasurgeon.fp8 holds the format's maths): pure maths.

Each block keeps its stored scale, or takes the fresh one (amax / 448 of W + ΔW), whichever stores its W + ΔW
closer: the smaller ‖D − ΔW‖², D = deq(q', s') − W being the change the stored weights carry; the stored scale on
ties, so a block ΔW does not move keeps its bytes. Re-rounding a whole block onto a fresh grid adds noise of the
order of the fp8 step, which for a small ΔW is larger than ΔW itself; keeping the stored scale alone clips what ΔW
pushes past ±448 · s. A non-finite W + ΔW is reported (`Fp8Merge.finite`), never stored.

On CPU the work is lorasurgeon.fp8_kernel's compiled loop (numba, the `fp8` extra), a band of block rows at a
time (CHUNK_ELEMENTS) on every torch thread. Elsewhere (CUDA), or without numba, it is the same arithmetic as
torch operations, some forty passes over each element (4-5 × slower on CPU): a chunk of whole blocks at a time
(a band of block rows, a run of block columns) through buffers made once per weight (`_Buffers`), so that no
temporary is allocated. The two routes differ only in the order each block's sums of squares are added in, so
they choose differently only between two scales that store a block equally well to within fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from lorasurgeon.fp8 import E4M3, BlockSums, DeltaRows, dequantize_into, fresh_scale, grid_shape, quantize_into

# Elements of W merged at a time (whole blocks). The torch route keeps six fp32 buffers of it, so that its passes
# over a chunk run from the cache (measured on the 2-core VM: 2^20 beat 2^18 and 2^22).
CHUNK_ELEMENTS = 1 << 20


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
    grid = grid_shape(tuple(q.shape), block)
    codes = q.reshape(-1, m, n).view(torch.uint8).contiguous()
    rows_of = delta if callable(delta) else _rows_of(delta.reshape(-1, m, n))
    scales = scale_inv.reshape(-1, grid[-2], grid[-1]).contiguous()
    out_q, out_s = torch.empty_like(codes), torch.empty_like(scales)
    route = _on_cpu if q.device.type == "cpu" else _in_chunks
    totals = route(codes, scales, rows_of, block, power_of_two, out_q, out_s)
    if totals.wanted == 0:
        survival, error = (1.0, 0.0) if totals.got == 0 else (math.inf, math.inf)
    else:
        survival, error = math.sqrt(totals.got / totals.wanted), math.sqrt(totals.missed / totals.wanted)
    finite = totals.finite and bool(torch.isfinite(out_s).all())
    return Fp8Merge(out_q.view(E4M3).reshape(q.shape), out_s.reshape(scale_inv.shape), survival, error,
                    totals.rescaled, finite)  # fmt: skip


@dataclass
class _Totals:
    """What a merge's chunks add up to: ‖ΔW‖², ‖D‖², ‖D − ΔW‖² (fp64), the blocks rescaled, and whether every
    block's W + ΔW was finite."""

    wanted: float = 0.0
    got: float = 0.0
    missed: float = 0.0
    rescaled: int = 0
    finite: bool = True

    def add(self, wanted: float, got: float, missed: float, rescaled: int, finite: bool) -> None:
        self.wanted, self.got, self.missed = self.wanted + wanted, self.got + got, self.missed + missed
        self.rescaled, self.finite = self.rescaled + rescaled, self.finite and finite


def _on_cpu(
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows_of: DeltaRows,
    block: tuple[int, int],
    power_of_two: bool,
    out_q: torch.Tensor,
    out_s: torch.Tensor,
) -> _Totals:
    """The CPU route: lorasurgeon.fp8_kernel's compiled loop, or without numba (the `fp8` extra) the torch route."""
    try:
        from lorasurgeon import fp8_kernel  # imports numba: only a CPU FP8 merge pays for it
    except ImportError:  # numba missing, or not working with this numpy
        return _in_chunks(codes, scales, rows_of, block, power_of_two, out_q, out_s)
    totals = _Totals()
    for band in fp8_kernel.merge_bands(codes, scales, rows_of, block, power_of_two, out_q, out_s, CHUNK_ELEMENTS):
        totals.add(*band)
    return totals


def _in_chunks(
    codes: torch.Tensor,
    scales: torch.Tensor,
    rows_of: DeltaRows,
    block: tuple[int, int],
    power_of_two: bool,
    out_q: torch.Tensor,
    out_s: torch.Tensor,
) -> _Totals:
    """The torch route (CUDA): a band of block rows and a run of block columns at a time, in `_Buffers`."""
    (_, m, n), (bm, bn), (sm, sn) = codes.shape, block, scales.shape[1:]
    cols = min(sn, max(1, CHUNK_ELEMENTS // (bm * bn))) * bn  # a chunk: whole blocks, ~CHUNK_ELEMENTS
    rows = min(sm, max(1, CHUNK_ELEMENTS // (bm * cols))) * bm
    buffers, totals = _Buffers.of(rows, cols, codes.device), _Totals()
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
                totals.add(*sums)
    return totals


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
) -> tuple[torch.Tensor, torch.Tensor, BlockSums]:
    """One chunk of blocks (uint8 codes, r × n, and ΔW; views): (the merged codes padded to whole blocks, a
    view of a buffer; s'; its part of _Totals). Padding is code 0 and ΔW 0, so it stores
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
    kept_miss = _candidate(work, delta, s, work.kept_codes, work.kept, block)
    amax = _block_amax(work, block)
    new_scale = fresh_scale(amax, power_of_two, scale.dtype)
    fresh_miss = _candidate(work, delta, new_scale.to(torch.float32), work.fresh_codes, work.fresh, block)
    keep = kept_miss <= fresh_miss  # (sm, sn); NaN where W + ΔW is not finite, which `amax` reports
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
    finite = bool(torch.isfinite(amax).all())
    return chosen_codes, chosen_scale, (_square(delta), got, missed, keep.numel() - kept, finite)


def _candidate(
    work: _Buffers,
    delta: torch.Tensor,
    scale: torch.Tensor,
    codes: torch.Tensor,
    stored: torch.Tensor,
    block: tuple[int, int],
) -> torch.Tensor:
    """W + ΔW quantized on `scale` into `codes`, its dequantized values into `stored`; returns each block's
    ‖D − ΔW‖² = ‖(stored − W) − ΔW‖² (fp32, grid shaped). The codes need no NaN check (dequantize_into): they
    hold one only where W + ΔW is not finite, which the merge reports instead of storing."""
    (rows, n), (bm, bn) = work.target.shape, block
    quantize_into(codes, stored, work.target, scale, block)
    dequantize_into(stored, codes, scale, block, work.bits, checked=False)
    error = torch.sub(stored, work.base, out=work.scratch).sub_(delta).view(rows, n // bn, bn)
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
