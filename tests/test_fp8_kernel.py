"""lorasurgeon.fp8_kernel, the CPU merge's compiled loop: its e4m3 decode and rounding against torch's own casts,
and the whole merge against the torch route (what CUDA runs), bit for bit, on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgeon import fp8, fp8_merge

numba = pytest.importorskip("numba")  # the `fp8` extra (the test extras include it)
from lorasurgeon import fp8_kernel  # noqa: E402  (imports numba)

E4M3 = torch.float8_e4m3fn


@numba.njit
def _decode_all(codes: np.ndarray) -> np.ndarray:
    out = np.empty(codes.shape, np.float32)
    for i in range(codes.size):
        out[i] = fp8_kernel._decode(codes[i])
    return out


@numba.njit
def _quantize_all(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, values = np.empty(x.shape, np.uint8), np.empty(x.shape, np.float32)
    for i in range(x.size):
        codes[i], values[i] = fp8_kernel._quantize(x[i])
    return codes, values


def test_decode_is_torchs_cast_for_every_code() -> None:
    codes = np.arange(256, dtype=np.uint8)
    want = torch.from_numpy(codes).view(E4M3).float().numpy()
    got = _decode_all(codes)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() == 2
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite].view(np.int32), want[finite].view(np.int32))  # −0 stays −0


def test_rounding_is_torchs_cast() -> None:
    """Every e4m3 value, every midpoint between neighbours (ties go to the even code), one fp32 ulp either side
    of each, ±0, values past ±448 (clamped), fp32 subnormals, and a million random fp32 bit patterns in range."""
    grid = np.unique(np.abs(torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float().numpy()))
    grid = grid[np.isfinite(grid)].astype(np.float32)
    middles = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
    assert np.array_equal(middles.astype(np.float64), (grid[1:].astype(np.float64) + grid[:-1]) / 2)  # exact
    near = np.concatenate([np.nextafter(middles, np.float32(0)), np.nextafter(middles, np.float32(1e9))])
    special = np.array([0.0, 449.0, 464.0, 1e30, np.inf, 1e-45, 1e-40, 2.0**-10, 2.0**-9 * 1.5], np.float32)
    random = np.random.default_rng(0).integers(0, 0x43E00000, 10**6, dtype=np.int32).view(np.float32)
    x = np.concatenate([grid, middles, near, special, random])
    x = np.concatenate([x, -x])
    codes, values = _quantize_all(x)
    want = torch.from_numpy(x).clamp(-448, 448).to(E4M3)
    assert np.array_equal(codes, want.view(torch.uint8).numpy())
    assert np.array_equal(values.view(np.int32), want.float().numpy().view(np.int32))
    assert len(np.unique(codes)) == 254  # guard: every finite code was produced
    nan_codes, _ = _quantize_all(np.array([np.nan], np.float32))
    assert nan_codes[0] == torch.tensor([float("nan")]).to(E4M3).view(torch.uint8).item()


def _weights(shape: tuple[int, ...], block: tuple[int, int], seed: int, scale_dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    q, s = fp8.quantize_blocks(torch.randn(shape, generator=generator), block, scale_dtype=scale_dtype)
    delta = torch.randn(shape, generator=generator) * 0.3
    cells = [torch.arange(n) // b for n, b in zip(shape[-2:], block, strict=True)]
    delta[..., (cells[0][:, None] + cells[1][None, :]) % 3 == 1] = 0  # blocks that keep their bytes
    return q, s, delta


@pytest.mark.parametrize(
    ("shape", "block", "scale_dtype", "power_of_two"),
    [
        ((300, 200), (32, 32), torch.float32, False),
        ((2, 130, 270), (32, 64), torch.float32, False),
        ((96, 80), (32, 16), torch.bfloat16, False),
        ((96, 80), (16, 16), torch.float32, True),
        ((40, 72), (1, 72), torch.float32, False),  # per channel
        ((40, 72), (40, 72), torch.float32, False),  # per tensor
    ],
)
def test_cpu_kernel_is_the_torch_route(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    power_of_two: bool,
) -> None:
    """The compiled loop (CPU) and the torch operations (CUDA's route, run here on CPU) merge alike: codes and
    scales bit for bit, figures to fp32 summation; with small bands on one thread and on two."""
    q, s, delta = _weights(shape, block, 14, scale_dtype)
    kernel = fp8_merge.merge_fp8_block(q, s, delta, block, power_of_two)
    monkeypatch.setattr(fp8_merge, "CHUNK_ELEMENTS", 2 * block[0] * block[1])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            banded = fp8_merge.merge_fp8_block(q, s, delta, block, power_of_two)
        finally:
            torch.set_num_threads(2)
        assert torch.equal(banded.q.view(torch.uint8), kernel.q.view(torch.uint8))
        assert torch.equal(banded.scale_inv, kernel.scale_inv) and banded.rescaled == kernel.rescaled
    monkeypatch.setattr(fp8_merge, "_on_cpu", fp8_merge._in_chunks)
    route = fp8_merge.merge_fp8_block(q, s, delta, block, power_of_two)
    assert torch.equal(route.q.view(torch.uint8), kernel.q.view(torch.uint8))
    assert torch.equal(route.scale_inv, kernel.scale_inv) and route.rescaled == kernel.rescaled
    assert route.survival == pytest.approx(kernel.survival, rel=1e-5)
    assert route.error == pytest.approx(kernel.error, rel=1e-5)
    kept = kernel.scale_inv == s  # guards: some blocks keep their scale and bytes, some take a fresh one
    assert (kept.numel() == 1 or (kept.any() and not kept.all())) and kernel.finite and kernel.q.dtype == E4M3
    assert not torch.equal(kernel.q.view(torch.uint8), q.view(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    bm=st.sampled_from([1, 3, 16]),
    bn=st.sampled_from([2, 8, 32]),
    scale=st.floats(1e-6, 1e3),
    relative=st.floats(0, 2),
    seed=st.integers(0, 2**16),
)
def test_cpu_kernel_is_the_torch_route_on_any_shape(
    m: int, n: int, bm: int, bn: int, scale: float, relative: float, seed: int
) -> None:
    """Partial blocks of any size, per-channel-like (1, n) blocks, ΔW from nothing to twice W."""
    generator = torch.Generator().manual_seed(seed)
    q, s = fp8.quantize_blocks(torch.randn(m, n, generator=generator) * scale, (bm, bn))
    delta = torch.randn(m, n, generator=generator) * scale * relative
    kernel = fp8_merge.merge_fp8_block(q, s, delta, (bm, bn))
    route = fp8_merge._in_chunks
    codes, scales = q.reshape(1, m, n).view(torch.uint8), s.reshape(1, *s.shape)
    out_q, out_s = torch.empty_like(codes), torch.empty_like(scales)
    route(codes, scales, lambda e, a, b: delta[a:b], (bm, bn), False, out_q, out_s)
    # The routes add a block's squares in different orders, so they may choose differently, but only between two
    # scales that store the block equally well to fp32 rounding; where they choose alike, the codes are alike.
    exact = fp8.dequantize_blocks(q, s, (bm, bn)).double() + delta.double()

    def misses(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        stored = fp8.dequantize_blocks(codes.view(E4M3), scale, (bm, bn)).double()
        return fp8._blocks((stored - exact) ** 2, (bm, bn)).sum(dim=(-3, -1))

    differ = out_s[0] != kernel.scale_inv
    mine, theirs = misses(kernel.q, kernel.scale_inv), misses(out_q[0], out_s[0])
    assert torch.allclose(mine[differ], theirs[differ], rtol=1e-5, atol=1e-30)
    same = (~differ).repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n]
    assert torch.equal(out_q[0][same], kernel.q.view(torch.uint8)[same])


def test_nonfinite_base_codes_are_reported_on_both_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN code in the base (0x7F) makes W + ΔW NaN: reported, on either route, never stored as a merge."""
    q, s = fp8.quantize_blocks(torch.randn(32, 32), (16, 16))
    q.view(torch.uint8)[5, 7] = 0x7F
    assert not fp8_merge.merge_fp8_block(q, s, torch.full((32, 32), 0.01), (16, 16)).finite
    monkeypatch.setattr(fp8_merge, "_on_cpu", fp8_merge._in_chunks)
    assert not fp8_merge.merge_fp8_block(q, s, torch.full((32, 32), 0.01), (16, 16)).finite
    q.view(torch.uint8)[5, 7] = 0x7E  # guard: without it the merge is finite
    assert fp8_merge.merge_fp8_block(q, s, torch.full((32, 32), 0.01), (16, 16)).finite


def test_the_loops_use_512_bit_vectors_where_the_cpu_has_avx512() -> None:
    """numba's default leaves AVX-512 CPUs at 256-bit vectors; fp8_kernel asks for the wide ones, in a fresh
    process where the user chose no features, and leaves a choice the user made alone."""
    from numba.core import codegen

    if "+avx512f" not in codegen.get_host_cpu_features().split(","):
        pytest.skip("no AVX-512 on this CPU")
    probe = "import lorasurgeon.fp8_kernel; from numba.core import config; print(config.CPU_FEATURES)"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip().endswith(",-prefer-256-bit")
    env["NUMBA_CPU_FEATURES"] = "+avx2"
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "+avx2"


def test_bands_run_on_threads_kept_between_weights_and_stop_on_an_error() -> None:
    """The band threads outlive one weight (starting them per weight cost the 2-layer FP8 bench merge about 0.7 s
    of 4); a band that fails stops the merge with its error, the bands not started are cancelled, and none runs
    after it."""
    q, s, delta = _weights((256, 48), (8, 8), 3, torch.float32)
    codes, scales = q.reshape(1, 256, 48).view(torch.uint8), s.reshape(1, *s.shape)
    calls: list[tuple[int, threading.Thread]] = []

    def rows_of(e: int, top: int, bottom: int) -> torch.Tensor:
        calls.append((top, threading.current_thread()))
        if top == 24:
            raise ValueError("band 3 fails")
        return delta[top:bottom]

    out_q, out_s = torch.empty_like(codes), torch.empty_like(scales)
    with pytest.raises(ValueError, match="band 3 fails"):
        list(fp8_kernel.merge_bands(codes, scales, rows_of, (8, 8), False, out_q, out_s, 8 * 48))
    ran = len(calls)
    time.sleep(0.1)
    assert len(calls) == ran < 256 // 8  # of 32 bands
    pool = {t for t in threading.enumerate() if t.name.startswith("lorasurgeon-fp8")}
    assert {thread for _, thread in calls} <= pool
    calls.clear()
    assert len(list(fp8_kernel.merge_bands(codes, scales, rows_of, (8, 8), False, out_q, out_s, 8 * 48 * 16))) == 2
    assert len(calls) == 2 and {thread for _, thread in calls} <= pool  # no thread started for this weight
