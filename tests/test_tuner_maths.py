"""The maths of the non-LoRA PEFT tuners, below the plan: tuner_merge's refusals and fit clauses, and properties of
the rotations and products with hypothesis (inverses invert, butterflies permute, Cayley blocks are orthogonal).
The end-to-end oracle tests against PEFT are in test_tuners.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lorasurgeon import rotations, tuner_merge, weight_products
from lorasurgeon.adapter import TunerModule
from lorasurgeon.errors import MismatchError, UnsupportedError

RTOL = 1e-5


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-30))


def _module(tuner: str, params: dict[str, Any], writes: tuple[str, ...] = ("weight",)) -> TunerModule:
    return TunerModule(tuner, "m", {}, params, writes)


W = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("module", "factors", "words"),
    [
        (_module("IA3", {"feedforward": True}), {"ia3_l": torch.tensor([[1.0, 0.0, 2, 2, 2, 2]])}, "zero entry"),
        (
            _module("BOFT", {"factors": 1, "blocks": 3, "block_size": 2}),
            {"boft_R": torch.zeros(1, 3, 2, 2), "boft_s": torch.tensor([[0.0]] * 8)},
            "boft_s has a zero entry",
        ),
        (
            _module("ROAD", {"variant": "road_2", "group_size": 4}),
            {"road_theta": torch.ones(8), "road_alpha": torch.tensor([0.0] + [1.0] * 7)},
            "scaled to zero",
        ),
        (
            _module("HIRA", {"embedding": False}),
            {"hira_A": torch.ones(1, 6), "hira_B": -torch.ones(8, 1)},
            "zero entry",
        ),
        (_module("DEFT", {"method": "qr", "para": True, "scaling": 1.0}), {"deft_P": torch.randn(8, 2)}, "qr"),
        (
            _module("OSF", {"low_rank": 2}),
            {f"osf_svd_params.{n}": t for n, t in (("U_low", W[:, :2]), ("S_low", W[0, :2]), ("V_low", W[:2]))},
            "bottom singular directions",
        ),
    ],
)
def test_unmerge_is_refused_where_the_files_cannot_give_the_base(
    module: TunerModule, factors: dict[str, torch.Tensor], words: str
) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(words)):
        tuner_merge.unmerge(module, {"weight": W}, factors)


def test_oft_on_a_kxk_conv_is_refused_because_peft_merges_it_unlike_its_forward() -> None:
    module = _module(
        "OFT",
        {
            "block_size": 4,
            "blocks": 9,
            "block_share": False,
            "coft": False,
            "eps": 0.0,
            "neumann_terms": 5,
            "config_r": 0,
            "config_block_size": 4,
        },
    )
    with pytest.raises(MismatchError, match="merge differs from its forward"):
        tuner_merge.merge(
            module, {"weight": torch.randn(8, 4, 3, 3)}, {"oft_R.weight": torch.zeros(9, 6)}, layer="conv"
        )


@pytest.mark.oracle
def test_peft_merges_oft_on_a_3x3_conv_unlike_its_forward() -> None:
    """The fact behind the refusal above: PEFT's forward rotates unfolded 3×3 patches and folds them back
    (summing overlaps), which its merge_and_unload() (W Rᵀ on the flattened kernel) does not reproduce;
    on a 1×1 conv the two agree."""
    import peft

    gaps = {}
    for kernel in (1, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2))
        x = torch.randn(2, 4, 6, 6)
        config = peft.OFTConfig(target_modules=["0"], oft_block_size=4 if kernel == 1 else 12, init_weights=False)
        wrapped = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            unmerged = wrapped(x)
            gaps[kernel] = relative_error(wrapped.merge_and_unload()(x), unmerged)
    assert gaps[1] <= RTOL < 0.01 < gaps[3]


def test_check_names_what_does_not_fit() -> None:
    module = _module("IA3", {"feedforward": False}, ("weight", "bias"))
    assert tuner_merge.check(module, {"weight": (8, 6)}, {"ia3_l": (8, 1)}, "linear") is None
    assert "ia3_l [6, 1]" in str(tuner_merge.check(module, {"weight": (8, 6)}, {"ia3_l": (6, 1)}, "linear"))
    assert "does not adapt" in str(tuner_merge.check(_module("SHIRA", {}), {"weight": (8, 6)}, {}, "conv1d"))
    beft = _module("BEFT", {}, ("bias",))
    beft = dataclasses.replace(beft, needs=("bias",))
    assert "which the base lacks" in str(tuner_merge.check(beft, {"weight": (8, 6)}, {"beft_bias": (1, 8)}, "linear"))


def test_additive_tuners_give_the_delta_the_surgery_sums() -> None:
    module = _module("C3A", {})
    kernel = torch.randn(2, 3, 2)
    delta = tuner_merge.delta(module, (4, 6), {"c3a_kernel": kernel})
    assert tuner_merge.is_additive(module) and delta.shape == (4, 6)
    assert torch.allclose(tuner_merge.merge(module, {"weight": W[:4]}, {"c3a_kernel": kernel})["weight"], W[:4] + delta)
    assert not tuner_merge.is_additive(_module("OFT", {})) and not tuner_merge.is_additive(
        _module("MISS", {"kind": "bat"})
    )
    with pytest.raises(UnsupportedError, match="no ΔW independent"):
        tuner_merge.delta(_module("HRA", {"apply_gs": False}), (8, 6), {"hra_u": torch.ones(6, 1)})


# Properties of the maths, without PEFT.


@settings(max_examples=30, deadline=None)
@given(factors=st.integers(1, 3), half=st.sampled_from([1, 2, 4]), extra=st.integers(0, 2))
def test_butterfly_permutations_are_permutations(factors: int, half: int, extra: int) -> None:
    blocks = 2 ** (factors - 1) * 2**extra
    n = blocks * half * 2
    for i in range(factors):
        perm = rotations.butterfly_permutation(n, blocks // 2**i, half, factors - 1)
        assert sorted(perm.tolist()) == list(range(n))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), variant=st.sampled_from(["road_1", "road_2", "road_4"]))
def test_road_unmerge_inverts_its_merge(seed: int, variant: str) -> None:
    g = torch.Generator().manual_seed(seed)
    out, group = 8, 4
    size = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[variant]
    theta, alpha = torch.randn(size, generator=g), torch.rand(size, generator=g) + 0.5
    first, second = rotations.road_columns(variant, group, theta, alpha)
    # det = α₁α₂·cos(θ₁ − θ₂) for road_2/road_4: near 0 the pair's map is near singular and fp32 rounding is
    # amplified by 1/det; the inverse is exact maths, so it is checked where that amplification is small.
    assume(bool(rotations.road_determinants(first, second, group).abs().min() > 0.1))
    w = torch.randn(out, 5, generator=g)
    merged = rotations.road_merge(w, first, second, group)
    assert not torch.allclose(merged, w)
    assert torch.allclose(rotations.road_unmerge(merged, first, second, group), w, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), terms=st.integers(0, 6), coft=st.booleans())
def test_oft_merge_and_unmerge_are_inverse_and_cayley_is_orthogonal(seed: int, terms: int, coft: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(3, 6, generator=g) * 0.3  # 3 blocks of 4
    blocks = rotations.oft_blocks(vec, 4, coft, 0.5, terms)
    if terms == 0:  # the exact Cayley transform is orthogonal; its Neumann truncation only nearly so
        eye = torch.eye(4, dtype=torch.float64).expand_as(blocks)
        assert torch.allclose(blocks @ blocks.transpose(1, 2), eye, atol=1e-12)
    w = torch.randn(5, 12, generator=g)
    for embedding in (False, True):
        merged = rotations.oft_merge(w, blocks, embedding)
        assert torch.allclose(rotations.oft_unmerge(merged, blocks, embedding), w, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_deft_relu_unmerge_inverts_its_merge(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, r, w = torch.randn(8, 2, generator=g) * 0.3, torch.randn(2, 5, generator=g), torch.randn(8, 5, generator=g)
    q, gram = weight_products.deft_projection(p, "relu")
    merged = weight_products.deft_merge(w, q, gram, r, 0.5)
    assert not torch.allclose(merged, w)
    assert torch.allclose(weight_products.deft_unmerge(merged, q, gram, r, 0.5), w, atol=1e-4)
