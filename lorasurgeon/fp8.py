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

Dequantizing does not use torch's fp8 → fp32 cast, a scalar loop on CPU (about 3 ns an element, against 0.4 ns
for the route here on cached data): `dequantize_into` moves the e4m3 bits into an fp16 pattern by integer
arithmetic, which is exact, and fp16 → fp32 is a vector instruction. The merge itself is lorasurgeon.fp8_merge.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# What the merge's two routes (lorasurgeon.fp8_merge: torch operations; lorasurgeon.fp8_kernel: compiled) share:
DeltaRows = Callable[[int, int, int], torch.Tensor]  # (matrix, first row, end row) -> fp32 rows of ΔW
BlockSums = tuple[float, float, float, int, bool]  # over some blocks: ‖ΔW‖², ‖D‖², ‖D − ΔW‖², rescaled, finite


def grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale grid of a weight of `shape` (..., m, n): (..., ⌈m/bm⌉, ⌈n/bn⌉)."""
    *lead, m, n = shape
    return (*lead, -(-m // block[0]), -(-n // block[1]))


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 q · s, each block by its scale. `scale_inv` may have any shape holding the grid's elements
    (a per-tensor scale of shape () with block (m, n), a per-channel one (m, 1) with block (1, n))."""
    shape = tuple(q.shape)
    codes = _blocks(q.view(torch.uint8), block)  # (..., sm, bm, sn, bn); padding is code 0, +0.0
    whole = codes.reshape(*codes.shape[:-4], -1, codes.shape[-2] * block[1])
    out = torch.empty(whole.shape, dtype=torch.float32, device=q.device)
    scale = scale_inv.to(torch.float32).reshape(grid_shape(shape, block))
    dequantize_into(out, whole, scale, block, torch.empty_like(whole, dtype=torch.int16))
    return _unblocks(_blocks(out, block), shape)


def dequantize_into(
    out: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    bits: torch.Tensor,
    checked: bool = True,
) -> torch.Tensor:
    """`out` = e4m3(codes) · scale, each block by its scale, in fp32, and returned: `codes` uint8 (..., m, n) of
    whole blocks, `scale` fp32 (..., m/bm, n/bn), `bits` an int16 scratch shaped like `codes`.

    Bit for bit torch's fp8 cast times the scale, without the cast: e4m3(c) / 256 has the fp16 bit pattern
    (c & 0x80) << 8 | (c & 0x7F) << 7 (exponent and mantissa move from bits 6..0 to 13..7, fp16's exponent
    bias being e4m3's plus 8, subnormals included), which is 128 · int8(c) with bit 14 cleared (128 · int8(c)
    of a negative int8(c) = c − 256 sets bits 15 and 14); fp16 → fp32 is exact, and
    fl(e4m3(c) / 256 · 256 s) = fl(e4m3(c) · s), 256 being a power of two. The NaN codes 0x7F and 0xFF, which
    that pattern would read as ±480, are the one case left to torch's cast; `checked=False` skips looking for
    them (two passes over the codes), for a caller that knows what a NaN code would become.
    """
    if codes.numel() == 0:
        return out
    *lead, m, n = codes.shape
    bm, bn = block
    if checked and (int(codes.amax()) == 0xFF or int(codes.view(torch.int8).amax()) == 0x7F):
        out.copy_(codes.view(E4M3))
        factor = scale
    else:
        out.copy_(bits.copy_(codes.view(torch.int8)).mul_(128).bitwise_and_(~0x4000).view(torch.float16))
        factor = scale.mul(256)
    out.view(*lead, m // bm, bm, n // bn, bn).mul_(factor[..., :, None, :, None])
    return out


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
    if scale_inv is None:
        scale_inv = fresh_scale(blocks.abs().amax(dim=(-3, -1)), power_of_two, scale_dtype)
    whole = blocks.reshape(*blocks.shape[:-4], -1, blocks.shape[-2] * block[1])
    codes = torch.empty(whole.shape, dtype=torch.uint8, device=w.device)
    quantize_into(codes, torch.empty_like(whole), whole, scale_inv.to(torch.float32), block)
    return _unblocks(_blocks(codes, block), shape).view(E4M3), scale_inv


def quantize_into(
    codes: torch.Tensor, scaled: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """`codes` (uint8, returned) = e4m3 codes of RNE(clamp(w / s, ±448)), each block of fp32 `w` (..., m, n, whole
    blocks) divided by its `scale` (fp32, grid shaped) in fp32; `scaled` (fp32, like w) receives the clamped
    quotients (the cast rounds them)."""
    *lead, m, n = w.shape
    (bm, bn), per_block = block, scale[..., :, None, :, None]
    torch.div(w.view(*lead, m // bm, bm, n // bn, bn), per_block, out=scaled.view(*lead, m // bm, bm, n // bn, bn))
    codes.view(E4M3).copy_(scaled.clamp_(-E4M3_MAX, E4M3_MAX))
    return codes


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


def fresh_scale(amax: torch.Tensor, power_of_two: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Each block's fresh scale from its amax = max |W_blk| (any shape): amax / 448 (2^⌈log2⌉ of it for
    ue8m0), in `scale_dtype`; 1 for an all-zero block (or one whose scale underflows), where q is 0 whatever s is."""
    scale = amax / E4M3_MAX
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
