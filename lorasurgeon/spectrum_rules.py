"""How many singular values to keep: per module (`choose_rank`) or under one global budget (`allocate_budget`).

Every rule reads a module's complete spectrum σ (descending, fp64; from `factored.core_svd`, so exact zeros
past the true rank are present or absent without changing any sum). One definition each, k counted from 1:

- rank R:    k = min(R, len σ).
- energy F:  the smallest k with Σ_{i≤k} σᵢ² ≥ F·Σ σᵢ²                       (F in (0, 1]).
- ratio X:   the number of i with σᵢ/σ₁ ≥ 1/X, i.e. the last k with σ_k/σ₁ ≥ 1/X  (X ≥ 1; 0 for a zero ΔW).
- fro F:     the smallest k with √(Σ_{i≤k} σᵢ²) ≥ F·√(Σ σᵢ²), over the full spectrum (F in (0, 1]); the same
             k as energy F² up to the rounding of the square root.
Then k is raised to `min_rank` (the caller's floor: 1 for formats that cannot hold a rank-0 module), never
above len σ. A zero ΔW gives k = 0 before that floor under every rule.

How kohya's networks/resize_lora.py (sd-scripts, read at 48d368f) relates: its index functions already
return a *count* — `index_sv_ratio` counts σ > σ₁/X (strictly greater), `index_sv_fro` is
searchsorted(cumsum(σ²)/Σσ², F²) + 1, the smallest k above — each clamped to [1, len σ − 1], and then
`rank_resize` adds 1 again. So kohya keeps one component more than these rules in every dynamic mode
(new_rank = ours + 1, capped at --new_rank, and 1 for a zero matrix, σ₁ ≤ 1e-6), and its ratio rule drops
a σ exactly at σ₁/X that ours keeps. Its σ come from a dense SVD in fp32, whose values past the true rank are
rounding noise rather than zeros; its `sv_cumulative` (Σσ, not Σσ²) has no counterpart here. Its sv_fro is
over the full spectrum, unlike PR #2240's svd_lowrank route, which sums only a truncated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lorasurgeon.errors import LorasurgeonError

if TYPE_CHECKING:  # torch-free at import: the options are validated before torch loads (algebra_options)
    import torch

RuleKind = Literal["rank", "energy", "ratio", "fro"]


@dataclass(frozen=True)
class SpectrumRule:
    """One per-module rank rule and its parameter (see the module docstring); validated on construction."""

    kind: RuleKind
    value: float

    def __post_init__(self) -> None:
        if self.kind == "rank" and (self.value != int(self.value) or self.value < 1):
            raise LorasurgeonError(f"--rank {self.value}: must be a whole number of at least 1")
        if self.kind in ("energy", "fro") and not 0 < self.value <= 1:
            raise LorasurgeonError(f"--{self.kind} {self.value}: must be in (0, 1]")
        if self.kind == "ratio" and not self.value >= 1:
            raise LorasurgeonError(f"--ratio {self.value}: must be at least 1 (σ_k/σ₁ ≥ 1/X)")


def choose_rank(sigma: torch.Tensor, rule: SpectrumRule, min_rank: int = 1) -> int:
    """k for one module's complete spectrum `sigma` under `rule`, then raised to `min_rank`, at most len σ."""
    import torch

    s = sigma.double()
    if rule.kind == "rank":
        k = int(rule.value)
    elif rule.kind == "ratio":
        k = int((s / s[0] >= 1.0 / rule.value).sum().item()) if len(s) and s[0] > 0 else 0
    else:
        cumulative = torch.cumsum(s.square(), 0)  # Σ_{i≤k} σᵢ² at index k − 1
        total = float(cumulative[-1].item()) if len(s) else 0.0
        if rule.kind == "energy":
            reached = (cumulative >= rule.value * total).tolist()
        else:
            # Roots in Python floats: math.sqrt is correctly rounded, torch's vectorised fp64 sqrt is not always
            # (√2 came out one ulp low), and F = 1 would then be reached nowhere.
            target = rule.value * math.sqrt(total)
            reached = [math.sqrt(c) >= target for c in cumulative.tolist()]
        # The first k that reaches the target (the whole spectrum always does); 0 for a zero ΔW, whose every
        # target is 0 = the empty sum.
        k = next((i + 1 for i, hit in enumerate(reached) if hit), len(s)) if total > 0 else 0
    return min(max(k, min_rank), len(s))
