"""Properties of the merge maths (hypothesis), and a literal small case.

Stated tolerance for merge∘unmerge: each of the two steps rounds once to the storage dtype, whose unit
roundoff is u (2⁻²⁴ fp32, 2⁻⁸ bf16, 2⁻¹¹ fp16), so |unmerge(merge(W)) − W| ≤ 2u·(|W| + |ΔW|) elementwise.
"""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgeon import linalg

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@st.composite
def lora_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
    out_f, in_f, rank = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 6))
    transpose = draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    magnitude = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    shape = (in_f, out_f) if transpose else (out_f, in_f)
    weight = torch.randn(shape, generator=generator) * magnitude
    a = torch.randn(rank, in_f, generator=generator)
    b = torch.randn(out_f, rank, generator=generator) * draw(st.sampled_from([1e-2, 1.0]))
    return weight, a, b, draw(st.floats(0.01, 8.0)), transpose


def merged(weight: torch.Tensor, delta: torch.Tensor, sign: int, dtype: torch.dtype) -> torch.Tensor:
    """What the surgery does with one tensor: fp32 copy, add the (summed) delta in place, round once."""
    exact = weight.float().clone()
    linalg.add_delta_(exact, delta, sign)
    return exact.to(dtype)


@settings(max_examples=150, deadline=None)
@given(case=lora_case(), dtype=st.sampled_from(list(UNIT_ROUNDOFF)))
def test_unmerge_inverts_merge_within_two_roundings(case: tuple, dtype: torch.dtype) -> None:
    weight, a, b, scale, transpose = case
    weight = weight.to(dtype)
    delta = linalg.lora_delta(a, b, scale, transpose)
    restored = merged(merged(weight, delta, +1, dtype), delta, -1, dtype)
    bound = 2 * UNIT_ROUNDOFF[dtype] * (weight.float().abs() + delta.abs()) + 1e-30
    assert ((restored.float() - weight.float()).abs() <= bound).all()


@settings(max_examples=100, deadline=None)
@given(case=lora_case())
def test_scale_zero_is_the_identity(case: tuple) -> None:
    weight, a, b, _, transpose = case
    assert torch.equal(merged(weight, linalg.lora_delta(a, b, 0.0, transpose), +1, torch.float32), weight)


@settings(max_examples=100, deadline=None)
@given(case=lora_case())
def test_two_halves_equal_one_whole(case: tuple) -> None:
    """Merging at scale s/2 twice in one pass gives bit-for-bit the merge at scale s (halving is exact)."""
    weight, a, b, scale, transpose = case
    half = linalg.lora_delta(a, b, scale / 2, transpose)
    whole = linalg.lora_delta(a, b, scale, transpose)
    assert torch.equal(merged(weight, half + half, +1, torch.float32), merged(weight, whole, +1, torch.float32))


@settings(max_examples=100, deadline=None)
@given(case=lora_case())
def test_delta_matches_float64_reference(case: tuple) -> None:
    weight, a, b, scale, transpose = case
    expected = scale * (b.double().numpy() @ a.double().numpy())
    expected = expected.T if transpose else expected
    got = linalg.lora_delta(a, b, scale, transpose).double().numpy()
    assert got.shape == weight.shape
    rank = a.shape[0]
    # fp32 dot products of length r (error ≤ r·u·Σ|b||a|), then the scale's own rounding to fp32 and the
    # rounding of the scaled product: ≤ (r + 2)·u relative to Σ|b||a|·scale; doubled for slack on the bound.
    bound = 2 * (rank + 2) * 2.0**-24 * scale * (np.abs(b.double().numpy()) @ np.abs(a.double().numpy()))
    assert (np.abs(got - expected) <= (bound.T if transpose else bound) + 1e-30).all()


def test_literal_small_case() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0]])  # (r=1, in=3)
    b = torch.tensor([[1.0], [-1.0]])  # (out=2, r=1)
    delta = linalg.lora_delta(a, b, 0.5, transpose=False)
    assert delta.tolist() == [[0.5, 1.0, 1.5], [-0.5, -1.0, -1.5]]
    assert linalg.lora_delta(a, b, 0.5, transpose=True).tolist() == [[0.5, -0.5], [1.0, -1.0], [1.5, -1.5]]
    weight = torch.ones(2, 3, dtype=torch.bfloat16)
    assert merged(weight, delta, +1, torch.bfloat16).tolist() == [[1.5, 2.0, 2.5], [0.5, 0.0, -0.5]]


def test_overflow_and_nonfinite_counts() -> None:
    exact = torch.tensor([1.0, 70000.0, float("nan")])
    rounded = exact.to(torch.float16)
    assert linalg.overflow_count(exact, rounded) == 1
    assert linalg.nonfinite_count(rounded) == 2
    assert linalg.nonfinite_count(torch.arange(3)) == 0


@settings(max_examples=100, deadline=None)
@given(case=lora_case(), sign=st.sampled_from([1, -1]))
def test_in_place_add_is_bit_identical_to_peft_order(case: tuple, sign: int) -> None:
    """add_delta_ (in place, alpha=±1) rounds exactly as PEFT's fp32(W) ± ((B @ A) · s) does."""
    weight, a, b, scale, transpose = case
    product = b.float() @ a.float()
    expected = weight.float() + sign * ((product.T if transpose else product) * scale)
    in_place = weight.clone()
    linalg.add_delta_(in_place, linalg.lora_delta(a, b, scale, transpose), sign)
    assert torch.equal(in_place, expected)


def test_fits_is_false_exactly_for_nonfinite_or_out_of_range() -> None:
    assert linalg.fits(torch.tensor([1.0, -65504.0]), torch.float16)
    assert not linalg.fits(torch.tensor([1.0, 65520.0]), torch.float16)  # rounds to inf in fp16
    assert not linalg.fits(torch.tensor([1.0, float("nan")]), torch.float32)
    assert not linalg.fits(torch.tensor([float("-inf"), 0.0]), torch.bfloat16)
    assert linalg.fits(torch.tensor([3e38]), torch.float32)
    assert linalg.fits(torch.empty(0), torch.float16)


@st.composite
def blockwise_case(draw: st.DrawFn) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float, bool]]]:
    """A weight and one to three LoRA terms (A, B, scale, transpose) that all fit it."""
    out_f, in_f, transpose = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.booleans())
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weight = torch.randn((in_f, out_f) if transpose else (out_f, in_f), generator=generator)
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        rank = draw(st.integers(1, 6))
        a, b = torch.randn(rank, in_f, generator=generator), torch.randn(out_f, rank, generator=generator)
        terms.append((a, b * draw(st.sampled_from([1e-2, 1.0])), draw(st.floats(0.01, 8.0)), transpose))
    return weight, terms


@settings(max_examples=200, deadline=None)
@given(
    case=blockwise_case(),
    sign=st.sampled_from([1, -1]),
    dtype=st.sampled_from(list(UNIT_ROUNDOFF)),
    block=st.integers(1, 7),
)
def test_blockwise_merge_equals_the_whole_tensor_route_within_delta_rounding(
    case: tuple, sign: int, dtype: torch.dtype, block: int
) -> None:
    """merge_blockwise, in blocks of `block` rows, equals the whole-tensor route (each term's lora_delta,
    summed in order, added once with add_delta_, rounded once) up to how BLAS sums the r products of ΔW,
    which may differ with the block's shape: |difference| <= 1 ulp of the output + 2r·u32·Σ s·|B||A|."""
    weight, terms = case
    weight = weight.to(dtype)
    delta = linalg.lora_delta(*terms[0])
    for term in terms[1:]:
        delta += linalg.lora_delta(*term)
    expected = merged(weight, delta, sign, dtype)
    with patch.object(linalg, "BLOCK_ELEMENTS", 0), patch.object(linalg, "MIN_BLOCK_ROWS", block):
        result, fit = linalg.merge_blockwise(weight, terms, sign, dtype)
    assert fit
    assert result.dtype == dtype and result.shape == weight.shape
    magnitude = sum(linalg.lora_delta(a.abs(), b.abs(), s, t) * 2 * a.shape[0] * 2.0**-24 for a, b, s, t in terms)
    ulp = (expected.float().abs() * UNIT_ROUNDOFF[dtype] * 2).clamp(min=torch.finfo(dtype).tiny)
    assert ((result.float() - expected.float()).abs() <= ulp + magnitude).all()
