"""lorasurgeon.fp8 against formulas written here in numpy (no torch fp8 cast), DeepSeek-V3's reference semantics,
transformers' Fp8Quantize / Fp8Dequantize and compressed-tensors' FP8BlockDequantizer.

The reference (`e4m3`, `quantize`, `merge`) rounds to the e4m3 grid by hand: RNE of x / 2^(e−3), e the binade
(at least −6, below which e4m3 is subnormal). One tolerance rule follows from it: lorasurgeon works in fp32, the
reference in fp64, so an element may round the other way only when its exact quotient lies within a few fp32
ulps of an e4m3 rounding midpoint (`near_midpoint`), and a fresh scale (amax / 448 of an fp32 sum) a few fp32
ulps from the fp64 one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lorasurgeon import fp8, fp8_merge

E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def e4m3(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even onto the e4m3 grid, |x| clipped to 448 first (fp64)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -448.0, 448.0)
    _, k = np.frexp(np.abs(x))  # |x| = m · 2^k, m in [0.5, 1): binade e = k − 1
    step = np.exp2(np.maximum(k - 1, -6) - 3.0)
    return np.round(x / step) * step  # np.round rounds half to even


def near_midpoint(x: np.ndarray, ulps: float = 8) -> np.ndarray:
    """Whether |x| lies within `ulps` fp32 ulps of a midpoint between two e4m3 values."""
    _, k = np.frexp(np.abs(x))
    step = np.exp2(np.maximum(k - 1, -6) - 3.0)
    frac = np.abs(x) / step - np.floor(np.abs(x) / step)
    return np.abs(frac - 0.5) * step <= ulps * 2.0**-24 * np.abs(x)


def grid(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """(m, n) -> (sm, bm, sn, bn), zero padded."""
    m, n = x.shape
    sm, sn = -(-m // block[0]), -(-n // block[1])
    padded = np.zeros((sm * block[0], sn * block[1]), dtype=x.dtype)
    padded[:m, :n] = x
    return padded.reshape(sm, block[0], sn, block[1])


def spread(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Each block's scale repeated over its elements: kron(scale, 1_{bm×bn}) cut to `shape`."""
    return np.kron(scale, np.ones(block))[: shape[0], : shape[1]]


def quantize(w: np.ndarray, block: tuple[int, int], scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q as fp64 values, fp32 scale): DeepSeek's s = amax / 448 in fp32, q = RNE(fl32(w / s)), zero block s = 1."""
    w32 = w.astype(np.float32)
    if scale is None:
        amax = np.abs(grid(w32, block)).max(axis=(1, 3))
        scale = np.where(amax > 0, amax / np.float32(448), np.float32(1)).astype(np.float32)
    return e4m3(w32 / spread(scale, w.shape, block).astype(np.float32)), scale


def torch_q(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn)


def test_reference_rounding_is_the_e4m3_grid() -> None:
    """The hand-written e4m3 keeps all finite values and rounds each midpoint to the neighbour with an even code,
    as torch's cast does."""
    codes = {float(v): c for c, v in enumerate(E4M3_VALUES) if np.isfinite(v) and c != 0x80}  # 0x80 is −0
    values = np.array(sorted(codes))
    assert len(values) == 253 and np.array_equal(e4m3(values), values)
    mid = (values[:-1] + values[1:]) / 2
    rounded = e4m3(mid)
    assert all(codes[float(r)] % 2 == 0 for r in rounded) and np.isin(rounded, values).all()
    assert np.array_equal(rounded, torch.from_numpy(mid).float().to(torch.float8_e4m3fn).double().numpy())
    assert e4m3(np.array([1 + 1 / 16]))[0] == 1.0 and e4m3(np.array([1 + 3 / 16]))[0] == 1.25


@pytest.mark.parametrize(("shape", "block"), [((64, 96), (16, 32)), ((40, 72), (16, 32)), ((5, 3), (16, 16))])
def test_quantize_is_deepseeks_formula_bit_for_bit(shape: tuple[int, int], block: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 2, size=shape))  # many binades, subnormals too
    several = shape[0] > block[0]
    if several:
        w[: block[0], : block[1]] = 0  # an all-zero block
    q, s = fp8.quantize_blocks(torch.from_numpy(w).float(), block)
    ref_q, ref_s = quantize(w, block)
    assert s.dtype == torch.float32 and s.shape == ref_s.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert np.array_equal(s.numpy(), ref_s) and (s[0, 0] == 1) == several
    assert np.array_equal(q.double().numpy(), ref_q)
    assert q.view(torch.uint8).any(), "quantized to nothing"


@pytest.mark.parametrize(("shape", "block"), [((64, 96), (16, 32)), ((40, 72), (16, 32)), ((3, 40, 72), (16, 32))])
def test_dequantize_multiplies_each_block_by_its_scale(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    torch.manual_seed(0)
    q = (torch.randn(shape) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(fp8.grid_shape(shape, block)) * 1e-3
    got = fp8.dequantize_blocks(q, s, block)
    flat_q, flat_s = q.float().reshape(-1, *shape[-2:]).numpy(), s.reshape(-1, *s.shape[-2:]).numpy()
    want = np.stack(
        [fq * spread(fs, fq.shape, block).astype(np.float32) for fq, fs in zip(flat_q, flat_s, strict=True)]
    )
    assert got.dtype == torch.float32 and np.array_equal(got.reshape(want.shape).numpy(), want)


def test_dequantize_matches_compressed_tensors_block_dequantizer_on_edge_blocks() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

    torch.manual_seed(1)
    q, s = fp8.quantize_blocks(torch.randn(40, 72), (16, 32))
    theirs = FP8BlockDequantizer(targets=["x"], weight_block_size=(16, 32), dtype=torch.float32).process(
        {"x.weight": q, "x.weight_scale_inv": s}
    )["x.weight"]
    assert torch.equal(fp8.dequantize_blocks(q, s, (16, 32)), theirs)


def test_quantize_agrees_with_transformers_fp8quantize() -> None:
    """transformers multiplies by fl(448/amax) and stores fl(1/fl(448/amax)): scales within an fp32 ulp of ours,
    values within one e4m3 step, and equal almost everywhere. Its Fp8Dequantize is our dequantize bit for bit."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    config = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(32, 32), scale_fmt="float"))
    torch.manual_seed(2)
    w = torch.randn(128, 256)
    theirs = Fp8Quantize(config)._quantize_one("x.weight", w)
    q, s = fp8.quantize_blocks(w, (32, 32))
    assert torch.allclose(s, theirs["x.weight_scale_inv"], rtol=2**-23, atol=0)
    ours, other = fp8.dequantize_blocks(q, s, (32, 32)), fp8.dequantize_blocks(theirs["x.weight"], s, (32, 32))
    assert ((ours - other).abs() <= w.abs() / 8 + 1e-9).all()
    assert (q.view(torch.uint8) != theirs["x.weight"].view(torch.uint8)).float().mean() < 1e-3
    back = Fp8Dequantize(config)._dequantize_one(q, s, output_dtype=torch.float32)
    assert torch.equal(back, fp8.dequantize_blocks(q, s, (32, 32)))


def test_power_of_two_scales() -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 64) * 3
    q, s = fp8.quantize_blocks(w, (32, 32), power_of_two=True)
    amax = np.abs(grid(w.numpy(), (32, 32))).max(axis=(1, 3)).astype(np.float64) / 448
    assert np.array_equal(s.numpy(), np.exp2(np.ceil(np.log2(amax))).astype(np.float32))
    assert (fp8.dequantize_blocks(q, s, (32, 32)) - w).abs().max() <= s.max() * 16  # half a step at the top binade


def merge(q: np.ndarray, s: np.ndarray, delta: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The merge in fp64: T = q·s + ΔW; per block the stored scale or the fresh one, whichever stores T closer."""
    target = q * spread(s.astype(np.float64), q.shape, block) + delta
    keep_q, _ = quantize(target, block, s)
    fresh_q, fresh_s = quantize(target, block)
    misses = []
    for cq, cs in ((keep_q, s), (fresh_q, fresh_s)):
        misses.append((grid(cq * spread(cs.astype(np.float64), q.shape, block) - target, block) ** 2).sum(axis=(1, 3)))
    keep = misses[0] <= misses[1]
    return np.where(spread(keep, q.shape, block) > 0, keep_q, fresh_q), np.where(keep, s, fresh_s)


@pytest.mark.parametrize("relative", [1e-3, 3e-2, 1.0])
@pytest.mark.parametrize(("shape", "block"), [((64, 96), (16, 32)), ((40, 72), (16, 32))])
def test_merge_matches_fp64_formula(relative: float, shape: tuple[int, int], block: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    q, s = fp8.quantize_blocks(torch.from_numpy(rng.standard_normal(shape) * 0.02).float(), block)
    base = fp8.dequantize_blocks(q, s, block).numpy()
    delta = rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1]))
    delta = (delta * relative * np.linalg.norm(base) / np.linalg.norm(delta)).astype(np.float32)
    merged = fp8_merge.merge_fp8_block(q, s, torch.from_numpy(delta), block)
    ref_q, ref_s = merge(q.double().numpy(), s.numpy(), delta.astype(np.float64), block)
    # A fresh scale is amax / 448 of fp32(fp32(q·s) + ΔW) here, of the exact sum there: a few ulps apart.
    np.testing.assert_allclose(merged.scale_inv.numpy(), ref_s, rtol=2**-21, atol=0)
    target = base.astype(np.float64) + delta
    differ = merged.q.double().numpy() != ref_q
    assert near_midpoint(target / spread(ref_s.astype(np.float64), shape, block))[differ].all()
    assert differ.mean() < 1e-3 and not np.array_equal(merged.q.double().numpy(), q.double().numpy())
    change = fp8.dequantize_blocks(merged.q, merged.scale_inv, block).double().numpy() - base
    assert merged.survival == pytest.approx(np.linalg.norm(change) / np.linalg.norm(delta), rel=1e-5)
    assert merged.error == pytest.approx(np.linalg.norm(change - delta) / np.linalg.norm(delta), rel=1e-5)
    assert merged.rescaled == int((ref_s != s.numpy()).sum())


def test_merge_keeps_weights_and_scales_for_zero_delta() -> None:
    torch.manual_seed(5)
    q, s = fp8.quantize_blocks(torch.randn(48, 80), (16, 32))
    merged = fp8_merge.merge_fp8_block(q, s, torch.zeros(48, 80), (16, 32))
    assert (merged.survival, merged.error, merged.rescaled, merged.finite) == (1.0, 0.0, 0, True)
    assert torch.equal(merged.scale_inv, s) and torch.equal(merged.q.float(), q.float())  # −0 may become +0


def test_merge_figures_for_lost_and_large_deltas() -> None:
    torch.manual_seed(6)
    q, s = fp8.quantize_blocks(torch.randn(64, 64), (32, 32))
    lost = fp8_merge.merge_fp8_block(q, s, torch.full((64, 64), 1e-6), (32, 32))  # far below the fp8 step
    assert lost.survival == 0 and lost.error == 1 and torch.equal(lost.q.view(torch.uint8), q.view(torch.uint8))
    big = fp8_merge.merge_fp8_block(q, s, torch.randn(64, 64) * 30, (32, 32))  # amax grows 30x: fresh scales
    assert big.rescaled == 4 and big.error < 0.05 and not torch.equal(big.scale_inv, s)


def test_merge_reports_nonfinite() -> None:
    q, s = fp8.quantize_blocks(torch.randn(32, 32), (16, 16))
    delta = torch.zeros(32, 32)
    delta[3, 3] = float("inf")
    assert not fp8_merge.merge_fp8_block(q, s, delta, (16, 16)).finite


def test_merge_of_stacked_experts_is_per_expert() -> None:
    torch.manual_seed(7)
    q, s = fp8.quantize_blocks(torch.randn(3, 40, 72), (16, 32))
    delta = torch.randn(3, 40, 72) * 0.05
    merged = fp8_merge.merge_fp8_block(q, s, delta, (16, 32))
    one = fp8_merge.merge_fp8_block(q[1], s[1], delta[1], (16, 32))
    assert torch.equal(merged.q[1].view(torch.uint8), one.q.view(torch.uint8)) and torch.equal(
        merged.scale_inv[1], one.scale_inv
    )


def test_per_tensor_scale_is_one_block() -> None:
    torch.manual_seed(8)
    w = torch.randn(24, 40)
    q, s = fp8.quantize_blocks(w, (24, 40))
    merged = fp8_merge.merge_fp8_block(q, s.reshape(()), torch.randn(24, 40) * 0.3, (24, 40))
    assert merged.scale_inv.shape == () and merged.error < 0.2


def test_bf16_scales_are_rounded_before_dividing() -> None:
    """Qwen3's dense FP8 checkpoints store weight_scale_inv in BF16: the merge keeps that dtype, and each fresh
    scale is rounded to it before W + ΔW is divided by it, so q · s dequantizes with the scale stored."""
    torch.manual_seed(10)
    w = torch.randn(64, 64)
    q, s = fp8.quantize_blocks(w, (32, 32), scale_dtype=torch.bfloat16)
    ref_q, _ = quantize(w.double().numpy(), (32, 32), s.float().numpy())
    assert s.dtype == torch.bfloat16 and np.array_equal(q.double().numpy(), ref_q)
    delta = torch.randn(64, 64) * 5  # fresh scales everywhere
    merged = fp8_merge.merge_fp8_block(q, s, delta, (32, 32))
    assert merged.scale_inv.dtype == torch.bfloat16 and merged.rescaled == 4 and merged.error < 0.1
    target = (fp8.dequantize_blocks(q, s, (32, 32)) + delta).numpy()
    ref_q, _ = quantize(target, (32, 32), merged.scale_inv.float().numpy())
    assert np.array_equal(merged.q.double().numpy(), ref_q)


def test_dequantized_bf16_is_transformers_dequantize() -> None:
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(9)
    q, s = fp8.quantize_blocks(torch.randn(64, 64), (32, 32))
    config = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(32, 32)))
    theirs = Fp8Dequantize(config)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(fp8.dequantized(q, s, (32, 32), None, torch.bfloat16), theirs)
    delta = torch.randn(64, 64) * 0.01
    assert torch.equal(
        fp8.dequantized(q, s, (32, 32), delta, torch.bfloat16),
        (fp8.dequantize_blocks(q, s, (32, 32)) + delta).bfloat16(),
    )


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 50),
    n=st.integers(1, 50),
    bm=st.sampled_from([1, 4, 16]),
    bn=st.sampled_from([2, 8, 32]),
    scale=st.floats(1e-6, 1e3),
    relative=st.floats(0, 2),
    seed=st.integers(0, 2**16),
    torch_route=st.booleans(),
)
# A near tie that the merge, working in fp32, cannot see: a one-element block where the fresh scale stores
# fp32(W + ΔW) exactly and the stored one 1.4e-14 (an fp32 ulp of it) off the exact fp64 sum
@example(m=45, n=1, bm=1, bn=32, scale=1e-6, relative=2.0, seed=16820, torch_route=False)
@example(m=45, n=1, bm=1, bn=32, scale=1e-6, relative=2.0, seed=16820, torch_route=True)
def test_merge_is_never_worse_than_either_scale_policy(
    m: int, n: int, bm: int, bn: int, scale: float, relative: float, seed: int, torch_route: bool
) -> None:
    """Per block, the merged W + ΔW (exactly, in fp64) is stored at least as closely as with the stored scales
    alone or fresh scales alone, up to what the merge's fp32 arithmetic can tell apart; round trips stay within
    half an e4m3 step of each element. On the CPU's compiled loops and on the torch route (CUDA's)."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=generator) * scale
    q, s = fp8.quantize_blocks(w, (bm, bn))
    assert ((fp8.dequantize_blocks(q, s, (bm, bn)) - w).abs() <= w.abs() / 16 + s.max() * 2**-10 * 1.001).all()
    delta = torch.randn(m, n, generator=generator) * scale * relative
    with pytest.MonkeyPatch.context() as patch:  # not the fixture: hypothesis runs many examples per test call
        if torch_route:
            patch.setattr(fp8_merge, "_on_cpu", fp8_merge._in_chunks)
        merged = fp8_merge.merge_fp8_block(q, s, delta, (bm, bn))
    base = fp8.dequantize_blocks(q, s, (bm, bn))
    target = base + delta  # what each candidate quantizes, in fp32
    exact = base.double() + delta.double()  # what it should store

    def per_block(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(grid(x.numpy(), (bm, bn)).sum(axis=(1, 3)))

    def miss(cq: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        return per_block((fp8.dequantize_blocks(cq, cs, (bm, bn)).double() - exact) ** 2).sqrt()

    # The merge rounds W + ΔW and each error (stored − W) − ΔW in fp32: each element's error is off by less than
    # 2^-22 of |W + ΔW| + |W| + |ΔW|, and a wrong choice between two candidates costs at most twice that
    blind = 2 * per_block((2**-22 * (exact.abs() + base.double().abs() + delta.double().abs())) ** 2).sqrt()
    best = miss(merged.q, merged.scale_inv)
    for alone in (fp8.quantize_blocks(target, (bm, bn), scale_inv=s), fp8.quantize_blocks(target, (bm, bn))):
        assert (best <= miss(*alone) * (1 + 1e-5) + blind).all()


def test_delta_given_by_rows_is_the_same_merge() -> None:
    """The surgery hands the merge ΔW a chunk of rows at a time (never the whole ΔW of a large weight): the
    result is bit for bit that of the whole ΔW, for a matrix and for stacked experts."""
    generator = torch.Generator().manual_seed(9)
    for shape in ((200, 96), (3, 72, 40)):
        w = torch.randn(shape, generator=generator)
        q, s = fp8.quantize_blocks(w, (32, 32))
        delta = torch.randn(shape, generator=generator) * 0.3
        stacked = delta.reshape(-1, *shape[-2:])
        calls: list[tuple[int, int, int]] = []

        def rows(
            e: int, start: int, stop: int, stacked: torch.Tensor = stacked, calls: list[tuple[int, int, int]] = calls
        ) -> torch.Tensor:
            calls.append((e, start, stop))
            return stacked[e, start:stop].clone()

        whole = fp8_merge.merge_fp8_block(q, s, delta, (32, 32))
        chunked = fp8_merge.merge_fp8_block(q, s, rows, (32, 32))
        assert torch.equal(whole.q.view(torch.uint8), chunked.q.view(torch.uint8))
        assert torch.equal(whole.scale_inv, chunked.scale_inv)
        assert (whole.survival, whole.error, whole.rescaled) == (chunked.survival, chunked.error, chunked.rescaled)
        assert len({c[0] for c in calls}) == stacked.shape[0] and whole.error < 0.5  # guard: every matrix asked


def test_dequantizing_is_torchs_cast_for_every_code() -> None:
    """dequantize_into decodes e4m3 by integer arithmetic instead of torch's (scalar, slow) fp8 cast: bit for bit
    the cast times the scale for all 256 codes (−0 and subnormals included) on scales from a subnormal fp32 one
    to 2^100; the two NaN codes are NaN."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(4, 1)  # (4, 256): every code per row
    scale = torch.tensor([1.0, 3.7e-5, 2.0**-140, 2.0**100]).repeat_interleave(4).reshape(4, 4)  # block (1, 64)
    want = codes.view(torch.float8_e4m3fn).float() * scale.repeat_interleave(64, dim=1)
    got = fp8.dequantize_into(torch.empty(4, 256), codes, scale, (1, 64), torch.empty(4, 256, dtype=torch.int16))
    nan = torch.isnan(want)
    assert torch.equal(nan, torch.isnan(got)) and int(nan.sum()) == 8
    finite = codes[:, (codes[0] & 0x7F) != 0x7F]  # without NaN codes: the integer route itself
    want = finite.view(torch.float8_e4m3fn).float() * scale[:, :1]
    got = fp8.dequantize_into(
        torch.empty(want.shape), finite, scale[:, :1], (1, 254), torch.empty_like(finite, dtype=torch.int16)
    )
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit patterns: −0 stays −0
    assert got[0].unique().numel() == 253  # guard: every finite value decoded to its own


@pytest.mark.parametrize("shape", [(300, 200), (2, 130, 270)])
def test_chunks_of_rows_and_columns_are_the_same_merge(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]) -> None:
    """A weight larger than a chunk is merged a band of block rows and a run of block columns at a time, partial
    edge blocks and stacked experts included: bit for bit the merge done in one chunk. ΔW is zero on every other
    block, so chunks mix blocks that keep their stored bytes with blocks that take a fresh scale."""
    generator = torch.Generator().manual_seed(12)
    block = (32, 32)
    q, s = fp8.quantize_blocks(torch.randn(shape, generator=generator), block)
    delta = torch.randn(shape, generator=generator) * 0.5
    rows, cols = (torch.arange(n) // 32 for n in shape[-2:])
    zero = (rows[:, None] + cols[None, :]) % 2 == 0
    delta[..., zero] = 0
    whole = fp8_merge.merge_fp8_block(q, s, delta, block)
    monkeypatch.setattr(fp8_merge, "CHUNK_ELEMENTS", 2 * 32 * 32)  # two blocks a chunk: 32 rows × 64 columns
    chunked = fp8_merge.merge_fp8_block(q, s, delta, block)
    assert torch.equal(whole.q.view(torch.uint8), chunked.q.view(torch.uint8))
    assert torch.equal(whole.scale_inv, chunked.scale_inv) and whole.rescaled == chunked.rescaled
    assert chunked.survival == pytest.approx(whole.survival, rel=1e-6)
    assert chunked.error == pytest.approx(whole.error, rel=1e-6)
    kept = s == whole.scale_inv  # the zero-ΔW blocks keep their scale, and their codes
    assert kept[..., zero[::32, ::32]].all() and 0 < whole.rescaled < s.numel()
    assert torch.equal(whole.q.view(torch.uint8)[..., zero], q.view(torch.uint8)[..., zero])


@pytest.mark.gpu
def test_merge_on_cuda_is_the_cpu_merge() -> None:
    """The same passes on a GPU (`merge --device cuda`): codes and scales bit for bit the CPU merge's."""
    generator = torch.Generator().manual_seed(13)
    q, s = fp8.quantize_blocks(torch.randn(3, 300, 520, generator=generator), (128, 128))
    delta = torch.randn(3, 300, 520, generator=generator) * 0.2
    cpu = fp8_merge.merge_fp8_block(q, s, delta, (128, 128))
    gpu = fp8_merge.merge_fp8_block(q.cuda(), s.cuda(), delta.cuda(), (128, 128))
    assert torch.equal(gpu.q.cpu().view(torch.uint8), cpu.q.view(torch.uint8))
    assert torch.equal(gpu.scale_inv.cpu(), cpu.scale_inv) and gpu.rescaled == cpu.rescaled
    assert gpu.error == pytest.approx(cpu.error, rel=1e-5) and cpu.rescaled > 0


def test_without_numba_the_cpu_merge_takes_the_torch_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba is the `fp8` extra: when lorasurgeon.fp8_kernel cannot be imported, a CPU merge runs the torch
    operations instead, with the same result (tests/test_fp8_kernel.py compares the routes in detail)."""
    import sys

    generator = torch.Generator().manual_seed(15)
    q, s = fp8.quantize_blocks(torch.randn(96, 160, generator=generator), (32, 32))
    delta = torch.randn(96, 160, generator=generator) * 0.3
    calls: list[int] = []

    def torch_route(*args: object) -> object:
        calls.append(1)
        return route(*args)

    usual = fp8_merge.merge_fp8_block(q, s, delta, (32, 32))  # the compiled loop where numba is installed
    route = fp8_merge._in_chunks
    monkeypatch.setitem(sys.modules, "lorasurgeon.fp8_kernel", None)  # `import` then raises ImportError
    monkeypatch.delattr(sys.modules["lorasurgeon"], "fp8_kernel", raising=False)  # as if never imported
    monkeypatch.setattr(fp8_merge, "_in_chunks", torch_route)
    merged = fp8_merge.merge_fp8_block(q, s, delta, (32, 32))
    assert calls and merged.finite and 0 < merged.rescaled < s.numel() and merged.error < 0.1
    assert torch.equal(merged.q.view(torch.uint8), usual.q.view(torch.uint8))
    assert torch.equal(merged.scale_inv, usual.scale_inv)
