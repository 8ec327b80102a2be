"""TIES / DARE / magnitude pruning on dense per-module deltas (dense_merge.py): an independent implementation
of the papers' definitions, PEFT's merge_utils as an oracle, DARE's reproducibility and unbiasedness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgeon import dense_merge
from lorasurgeon.errors import LorasurgeonError


def ties_by_definition(
    deltas: list[torch.Tensor], weights: list[float], density: float, method: str, trim: bool = True
) -> np.ndarray:
    """TIES-Merging (Yadav et al. 2023) entry by entry in fp64 numpy: trim to the top ⌊density·n⌋ magnitudes
    (equal magnitudes: lower index first), elect γ = sign of the summed mass (or of the summed signs), +1 at 0,
    then the weighted mean over the tasks whose trimmed entry has sign γ."""
    taus = []
    for delta in deltas:
        flat = delta.double().numpy().ravel()
        if trim and density < 1:
            keep = np.argsort(-np.abs(flat), kind="stable")[: int(density * flat.size)]
            kept = np.zeros_like(flat)
            kept[keep] = flat[keep]
            flat = kept
        taus.append(flat)
    stacked = np.stack(taus)  # (tasks, entries)
    mass = stacked.sum(0) if method == "total" else np.sign(stacked).sum(0)
    gamma = np.where(mass >= 0, 1.0, -1.0)
    out = np.zeros(stacked.shape[1])
    for j in range(stacked.shape[1]):
        agreeing = [i for i in range(len(taus)) if np.sign(stacked[i, j]) == gamma[j]]
        if agreeing:
            out[j] = sum(weights[i] * stacked[i, j] for i in agreeing) / len(agreeing)
    return out.reshape(deltas[0].shape)


@st.composite
def small_integer_deltas(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[float]]:
    """2-5 deltas of one small shape with entries in -3..3 (many equal magnitudes, zeros, sign ties) and
    weights in multiples of 1/4: every sum is exact in fp32, so the comparison can be exact."""
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    count = draw(st.integers(2, 5))
    entries = st.lists(st.integers(-3, 3), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])
    deltas = [torch.tensor(draw(entries), dtype=torch.float32).reshape(shape) for _ in range(count)]
    weights = [draw(st.integers(-8, 8)) / 4 for _ in range(count)]
    return deltas, weights


@settings(max_examples=300, deadline=None)
@given(
    case=small_integer_deltas(),
    density=st.sampled_from([0.1, 0.25, 0.5, 0.7, 1.0]),
    method=st.sampled_from(["total", "frequency"]),
)
def test_ties_equals_the_papers_definition(
    case: tuple[list[torch.Tensor], list[float]], density: float, method: str
) -> None:
    deltas, weights = case
    got = dense_merge.ties(deltas, weights, density, method)  # type: ignore[arg-type]
    expected = torch.from_numpy(ties_by_definition(deltas, weights, density, method)).float()
    assert torch.equal(got, expected)


def test_ties_literal_case() -> None:
    """Two tasks, density 1: entry 0 agrees (mean of 2 and 4); entry 1 elects + (mass 3 − 1) and keeps only 3;
    entry 2 has mass −1 + 1 = 0, which elects +, so only task 2's 1 counts. Weights apply after the election."""
    deltas = [torch.tensor([2.0, 3.0, -1.0]), torch.tensor([4.0, -1.0, 1.0])]
    assert torch.equal(dense_merge.ties(deltas, [1.0, 1.0], 1.0), torch.tensor([3.0, 3.0, 1.0]))
    assert torch.equal(dense_merge.ties(deltas, [1.0, 0.5], 1.0), torch.tensor([2.0, 3.0, 0.5]))
    assert torch.equal(dense_merge.ties(deltas, [1.0, 1.0], 1.0, "frequency"), torch.tensor([3.0, 3.0, 1.0]))


@pytest.mark.oracle
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_and_magnitude_prune_equal_peft_merge_utils(method: str) -> None:
    """On random deltas (distinct magnitudes, so PEFT's topk has no ties to break) PEFT's own `ties` and
    `magnitude_prune` — what its ties_svd / magnitude_prune_svd apply to get_delta_weight — agree with ours."""
    from peft.utils import merge_utils

    generator = torch.Generator().manual_seed(5)
    deltas = [torch.randn(12, 9, generator=generator) for _ in range(3)]
    weights = [0.6, -0.3, 1.1]
    ours = dense_merge.ties(deltas, weights, 0.4, method)  # type: ignore[arg-type]
    theirs = merge_utils.ties(deltas, torch.tensor(weights), 0.4, method)  # type: ignore[arg-type]
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7) and ours.abs().max() > 0.1
    assert not torch.allclose(ours, sum(w * d for w, d in zip(weights, deltas, strict=True)))  # TIES changed something
    pruned = dense_merge.magnitude_prune(deltas, weights, 0.4)
    assert torch.allclose(pruned, merge_utils.magnitude_prune(deltas, torch.tensor(weights), 0.4), atol=1e-6)


def test_trim_keeps_the_largest_magnitudes_and_breaks_ties_by_index() -> None:
    delta = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 0.5, 2.0]])
    assert torch.equal(dense_merge.trim(delta, 0.5), torch.tensor([[0.0, -3.0, 2.0], [-2.0, 0.0, 0.0]]))
    assert torch.equal(dense_merge.trim(delta, 0.1), torch.zeros(2, 3))  # ⌊0.6⌋ = 0 entries kept
    assert dense_merge.trim(delta, 1.0) is delta


# --- DARE ---------------------------------------------------------------------------------------------------


def test_dare_is_reproducible_from_seed_module_and_index_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(40, 30, generator=generator) for _ in range(2)]
    one = dense_merge.dare(deltas, [0.5, 0.5], 0.3, seed=7, module="model.layers.0.mlp.up_proj")
    again = dense_merge.dare([d.clone() for d in deltas], [0.5, 0.5], 0.3, seed=7, module="model.layers.0.mlp.up_proj")
    assert torch.equal(one, again)
    assert not torch.equal(one, dense_merge.dare(deltas, [0.5, 0.5], 0.3, seed=8, module="model.layers.0.mlp.up_proj"))
    assert not torch.equal(one, dense_merge.dare(deltas, [0.5, 0.5], 0.3, seed=7, module="model.layers.1.mlp.up_proj"))
    masks = [dense_merge.dare_mask(torch.Size([40, 30]), 0.3, 7, "m", i) for i in range(2)]
    assert not torch.equal(masks[0], masks[1])  # each adapter of a module draws its own mask
    assert torch.equal(masks[0], dense_merge.dare_mask(torch.Size([40, 30]), 0.3, 7, "m", 0))
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(masks[1], dense_merge.dare_mask(torch.Size([40, 30]), 0.3, 7, "m", 1))


def test_dare_ties_is_ties_on_the_dropped_deltas() -> None:
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(7, 5, generator=generator) for _ in range(3)]
    weights = [1.0, 0.5, -0.25]
    dropped = [torch.where(dense_merge.dare_mask(d.shape, 0.6, 3, "k", i), d / 0.6, 0.0) for i, d in enumerate(deltas)]
    expected = torch.from_numpy(ties_by_definition(dropped, weights, 1.0, "total", trim=False)).float()
    got = dense_merge.dare_ties(deltas, weights, 0.6, seed=3, module="k")
    assert torch.allclose(got, expected, atol=1e-6) and not torch.equal(got, dense_merge.ties(deltas, weights, 1.0))


def test_dare_is_unbiased_in_expectation() -> None:
    """K = 400 draws (seeds 0..K-1) of DARE at density d = 0.3 on one fixed 64×64 τ.

    Each entry of the mean is τ·Bernoulli(d)/d averaged K times: unbiased, variance τ²(1 − d)/(dK). Stated
    tolerances (a wrong rescale, e.g. none, gives a bias of d − 1 = −0.7; a wrong p gives a variance ratio of
    about 2): the normalised bias S = Σ (mean − τ)·τ / Σ τ² has std σ_S = √((1 − d)/(dK)·Σ τ⁴/(Σ τ²)²) and must
    be within 5 σ_S; the mean squared error ‖mean − τ‖²/‖τ‖² must be within 15% of (1 − d)/(dK)."""
    d, draws = 0.3, 400
    tau = torch.randn(64, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mean = sum(dense_merge.drop_and_rescale(tau, d, seed, "m", 0) for seed in range(draws)) / draws
    assert isinstance(mean, torch.Tensor)
    t2, t4 = float(tau.square().sum()), float(tau.pow(4).sum())
    bias = float(((mean - tau) * tau).sum()) / t2
    sigma_bias = ((1 - d) / (d * draws) * t4 / t2**2) ** 0.5
    assert abs(bias) <= 5 * sigma_bias
    mse = float((mean - tau).square().sum()) / t2
    assert mse == pytest.approx((1 - d) / (d * draws), rel=0.15)
    kept = dense_merge.dare_mask(torch.Size([1000, 100]), d, 0, "m", 0).double().mean().item()
    assert abs(kept - d) <= 5 * (d * (1 - d) / 100_000) ** 0.5


def test_density_and_weights_are_checked() -> None:
    deltas = [torch.ones(2, 2)]
    with pytest.raises(LorasurgeonError, match=r"--density 0: must be in \(0, 1\]"):
        dense_merge.merge_dense("dare", deltas, [1.0], 0, seed=0, module="m")
    with pytest.raises(LorasurgeonError, match="m: 2 weights for 1 adapters"):
        dense_merge.merge_dense("ties", deltas, [1.0, 2.0], 0.5, seed=0, module="m")
    assert torch.equal(dense_merge.merge_dense("magnitude_prune", deltas, [2.0], 1.0, 0, "m"), torch.full((2, 2), 2.0))


# --- factorising a dense result -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), columns=st.integers(1, 20), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_dense_to_factors_is_the_truncated_svd(rows: int, columns: int, seed: int, data: st.DataObject) -> None:
    delta = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
    rank = data.draw(st.integers(1, min(rows, columns)))
    out = dense_merge.dense_to_factors(delta, rank)
    optimum = float(torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(delta.double() - (out.b @ out.a).double()))
    norm = float(torch.linalg.matrix_norm(delta.double()))
    assert error <= 1.0001 * optimum + 2**-20 * norm  # fp32 SVD: its rounding, ~1e-6·‖ΔW‖, is the slack
    assert out.b.shape == (rows, rank) and out.a.shape == (rank, columns)
