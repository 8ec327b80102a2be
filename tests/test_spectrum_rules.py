"""Rank rules (spectrum_rules.py) recomputed from their definitions, their off-by-one cases, kohya's relation, and
the global budget (budget.py) against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgeon.budget import allocate_budget, class_items, greedy_prefix
from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.spectrum_rules import SpectrumRule, choose_rank

spectra = st.lists(st.floats(0, 100), min_size=0, max_size=12).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64)
)


def by_definition(sigma: list[float], kind: str, value: float) -> int:
    """Each rule as its docstring states it, in plain Python floats, before the min_rank floor."""
    squares = [s * s for s in sigma]
    total = sum(squares)
    if kind == "rank":
        return min(int(value), len(sigma))
    if kind == "ratio":
        return sum(1 for s in sigma if s / sigma[0] >= 1 / value) if sigma and sigma[0] > 0 else 0
    for k in range(len(sigma) + 1):
        head = sum(squares[:k])
        if total > 0 and (head >= value * total if kind == "energy" else math.sqrt(head) >= value * math.sqrt(total)):
            return k
    return 0  # a zero ΔW


@settings(max_examples=400, deadline=None)
@given(
    sigma=spectra,
    rule=st.one_of(
        st.builds(SpectrumRule, st.just("rank"), st.integers(1, 16).map(float)),
        st.builds(SpectrumRule, st.just("energy"), st.floats(1e-6, 1)),
        st.builds(SpectrumRule, st.just("fro"), st.floats(1e-6, 1)),
        st.builds(SpectrumRule, st.just("ratio"), st.floats(1, 1e6)),
    ),
    min_rank=st.integers(0, 2),
)
def test_each_rule_is_its_definition(sigma: torch.Tensor, rule: SpectrumRule, min_rank: int) -> None:
    expected = min(max(by_definition(sigma.tolist(), rule.kind, rule.value), min_rank), len(sigma))
    assert choose_rank(sigma, rule, min_rank) == expected


@pytest.mark.parametrize(
    ("sigma", "kind", "value", "k"),
    [
        # σ² = 4, 4, 4, 4 (total 16): energy F is reached at exactly F·16.
        ([2, 2, 2, 2], "energy", 0.5, 2),  # Σ_{i≤2} = 8 = 0.5·16: the boundary is reached, so 2, not 3
        ([2, 2, 2, 2], "energy", 0.5 + 2**-20, 3),
        ([2, 2, 2, 2], "energy", 0.25, 1),
        ([2, 2, 2, 2], "energy", 1.0, 4),
        # fro F compares √(Σ_{i≤k}) with F·√16 = 4F: F = 0.5 is reached by the first σ alone.
        ([2, 2, 2, 2], "fro", 0.5, 1),  # √4 = 2 = 0.5·4 (energy 0.5 would need 2)
        ([2, 2, 2, 2], "fro", 0.75, 3),  # √8 ≈ 2.83 < 3 ≤ √12 ≈ 3.46
        # ratio X keeps σ_k/σ₁ ≥ 1/X: σ/σ₁ = 1, 0.5, 0.25, 0.125.
        ([4, 2, 1, 0.5], "ratio", 4.0, 3),  # 0.25 ≥ 1/4: the boundary is kept
        ([4, 2, 1, 0.5], "ratio", 3.99, 2),
        ([4, 2, 1, 0.5], "ratio", 1.0, 1),
        ([4, 2, 1, 0.5], "rank", 8.0, 4),  # a fixed rank above len σ keeps all of it
        ([0, 0, 0], "energy", 0.9, 0),  # a zero ΔW needs nothing, under every rule
        ([0, 0, 0], "ratio", 10.0, 0),
        ([], "fro", 0.5, 0),
    ],
)
def test_off_by_one_cases(sigma: list[float], kind: str, value: float, k: int) -> None:
    assert choose_rank(torch.tensor(sigma, dtype=torch.float64), SpectrumRule(kind, value), min_rank=0) == k  # type: ignore[arg-type]


def test_min_rank_floors_but_never_exceeds_the_spectrum() -> None:
    assert choose_rank(torch.zeros(3, dtype=torch.float64), SpectrumRule("energy", 0.9), min_rank=1) == 1
    assert choose_rank(torch.zeros(0, dtype=torch.float64), SpectrumRule("energy", 0.9), min_rank=1) == 0


def kohya_rank(sigma: torch.Tensor, kind: str, value: float, cap: int) -> int:
    """sd-scripts networks/resize_lora.py (48d368f) `rank_resize` for sv_ratio / sv_fro, rewritten from its
    definitions: index_sv_ratio counts σ > σ₁/X, index_sv_fro is searchsorted(cumsum σ²/Σσ², F²) + 1, both
    clamped to [1, len − 1]; rank_resize then adds 1, caps at --new_rank, and gives 1 for σ₁ ≤ 1e-6."""
    if kind == "ratio":
        index = int((sigma > sigma[0] / value).sum().item())
    else:
        normalised = torch.cumsum(sigma.square(), 0) / sigma.square().sum()
        index = int(torch.searchsorted(normalised, torch.tensor(value**2, dtype=torch.float64)).item()) + 1
    new_rank = max(1, min(index, len(sigma) - 1)) + 1
    return 1 if sigma[0] <= 1e-6 else min(new_rank, cap)


@settings(max_examples=300, deadline=None)
@given(
    sigma=st.lists(st.floats(1e-3, 100), min_size=3, max_size=12, unique=True).map(
        lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64)
    ),
    kind=st.sampled_from(["ratio", "fro"]),
    value=st.floats(0.05, 0.999),
)
def test_kohya_keeps_one_more_than_our_rule(sigma: torch.Tensor, kind: str, value: float) -> None:
    """kohya = ours + 1 (capped) away from its clamps and from exact ties at the ratio threshold."""
    value = 1 / value if kind == "ratio" else value
    ours = choose_rank(sigma, SpectrumRule(kind, value), min_rank=0)  # type: ignore[arg-type]
    cap = len(sigma)
    tie = kind == "ratio" and bool((sigma == sigma[0] / value).any())
    if 1 <= ours <= len(sigma) - 1 and not tie:
        assert kohya_rank(sigma, kind, value, cap) == min(ours + 1, cap)


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("energy", 0.0, r"--energy 0.0: must be in \(0, 1\]"),
        ("fro", 1.5, r"--fro 1.5: must be in \(0, 1\]"),
        ("ratio", 0.5, "--ratio 0.5: must be at least 1"),
        ("rank", 0.0, "--rank 0.0: must be a whole number"),
        ("rank", 2.5, "--rank 2.5: must be a whole number"),
    ],
)
def test_bad_rule_values_are_refused(kind: str, value: float, message: str) -> None:
    with pytest.raises(LorasurgeonError, match=message):
        SpectrumRule(kind, value)  # type: ignore[arg-type]


# --- the global budget --------------------------------------------------------------------------------------


def brute_force(spectra: list[torch.Tensor], costs: list[int], budget: int, min_rank: int) -> float:
    """The largest kept energy Σ_m Σ_{i≤k_m} σ² over every allocation that fits the budget."""
    best = -1.0
    ranges = [range(min(min_rank, len(s)), len(s) + 1) for s in spectra]
    for ranks in itertools.product(*ranges):
        if sum(k * c for k, c in zip(ranks, costs, strict=True)) <= budget:
            best = max(best, sum(float(s[:k].square().sum()) for s, k in zip(spectra, ranks, strict=True)))
    return best


@st.composite
def budget_cases(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[int], int, int]:
    count = draw(st.integers(1, 4))
    sigma = st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]) | st.floats(0, 4), min_size=0, max_size=6)
    modules = [torch.tensor(sorted(draw(sigma), reverse=True), dtype=torch.float64) for _ in range(count)]
    # shared factors and coprime ones: a too-narrow proximity window fails on the latter (checked by mutation)
    costs = [draw(st.sampled_from([2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13])) for _ in range(count)]
    min_rank = draw(st.integers(0, 1))
    floor = sum(min(min_rank, len(s)) * c for s, c in zip(modules, costs, strict=True))
    budget = draw(st.integers(floor, floor + sum(len(s) * c for s, c in zip(modules, costs, strict=True))))
    return modules, costs, budget, min_rank


@settings(max_examples=500, deadline=None)
@given(case=budget_cases())
def test_budget_allocation_equals_brute_force(case: tuple[list[torch.Tensor], list[int], int, int]) -> None:
    modules, costs, budget, min_rank = case
    ranks = allocate_budget(modules, costs, budget, min_rank=min_rank)
    assert sum(k * c for k, c in zip(ranks, costs, strict=True)) <= budget
    assert all(min(min_rank, len(s)) <= k <= len(s) for s, k in zip(modules, ranks, strict=True))
    kept = sum(float(s[:k].square().sum()) for s, k in zip(modules, ranks, strict=True))
    assert kept == pytest.approx(brute_force(modules, costs, budget, min_rank), rel=1e-12, abs=1e-12)


def test_greedy_by_ratio_is_not_optimal_but_the_allocation_is() -> None:
    """Budget 12: greedy takes the 1.1-per-parameter item of cost 10 and then nothing fits (energy 11);
    the three 1.0-per-parameter items of cost 4 keep 12."""
    modules = [torch.tensor([11**0.5], dtype=torch.float64), torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)]
    costs = [10, 4]
    greedy, _, _ = greedy_prefix(class_items(modules, costs, [0, 0], [1, 3]), 12)
    assert greedy == [0, 1]  # classes by cost, [4, 10]: greedy took the cost-10 item and none of cost 4
    assert allocate_budget(modules, costs, 12, min_rank=0) == [0, 3]


def test_budget_respects_max_rank_and_refuses_what_min_rank_cannot_pay() -> None:
    modules = [torch.tensor([5.0, 4.0, 3.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    assert allocate_budget(modules, [2, 2], 100, max_rank=2) == [2, 1]
    with pytest.raises(LorasurgeonError, match="--params 3: below the 4 parameters that rank 1 everywhere needs"):
        allocate_budget(modules, [2, 2], 3)


def test_llama_7b_sized_budget_runs_and_beats_greedy() -> None:
    """224 modules of rank 128 (q/k/v/o 4096², gate/up/down 4096+11008) at the parameters of rank 16."""
    generator = torch.Generator().manual_seed(0)
    costs = [8192] * 4 * 32 + [15104] * 3 * 32
    modules = [
        torch.sort(torch.rand(128, generator=generator, dtype=torch.float64), descending=True).values for _ in costs
    ]
    budget = 16 * sum(costs)
    ranks = allocate_budget(modules, costs, budget, min_rank=1)
    assert sum(k * c for k, c in zip(ranks, costs, strict=True)) <= budget
    assert len(set(ranks)) > 1  # it moved rank between modules
    classes = class_items(modules, costs, [1] * len(costs), [128] * len(costs))
    greedy, _, _ = greedy_prefix(classes, budget - sum(costs))
    kept = sum(float(s[:k].square().sum()) for s, k in zip(modules, ranks, strict=True))
    greedy_kept = sum(
        modules[0].new_tensor([g for _, g in items[:n]]).sum().item()
        for (_, items), n in zip(classes, greedy, strict=True)
    )
    assert kept >= greedy_kept + sum(float(s[0] ** 2) for s in modules) - 1e-9


@settings(max_examples=200, deadline=None)
@given(sigma=spectra.filter(lambda s: len(s) > 0 and float(s[0]) > 1e-100))
def test_fro_and_energy_one_stop_at_the_last_nonzero_value(sigma: torch.Tensor) -> None:
    """F = 1 is reached where the energy is complete, not past it: torch's fp64 sqrt (√2 one ulp low) once made
    [1, 1, 0] keep 3 under --fro 1, and a pow-rounded √total made a spectrum keep 1."""
    last = max(i + 1 for i, s in enumerate(sigma.tolist()) if s * s > 0)
    assert choose_rank(sigma, SpectrumRule("fro", 1.0), 0) <= last
    assert choose_rank(sigma, SpectrumRule("energy", 1.0), 0) <= last
    assert choose_rank(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), SpectrumRule("fro", 1.0), 0) == 2
