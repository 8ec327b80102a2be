"""Truncated SVD of one ΔW matrix, by the rule that picks its rank and the method that computes it.

SVD methods, and the error each guarantees (error = ‖ΔW − B·A‖_F, measured on the factors written):
- exact: torch.linalg.svd, the Eckart–Young optimum √(Σ_{i>r} σ_i²).
- randomized: a Gaussian range finder of r + max(r, 16) columns, refined by power iterations until one more
  lowers the rank-r error² by less than 0.1 % (`linalg.randomized_svd`), at most 12; a matrix that has not
  converged by then falls back to exact. Convergence of subspace iteration is geometric, so the 0.1 % test
  bounds what is left to gain: measured ≤ 1.001 × the optimum on power-law spectra (tests/test_extract.py,
  bench/results/extract.md), where one iteration without oversampling misses it by 5-16 %.
- auto: exact for small matrices (min(m, n) ≤ 1024, where it takes milliseconds), when the sketch would
  span more than a quarter of min(m, n), or for an energy rule without a max rank (the rank is unbounded);
  randomized otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lorasurgeon import linalg
from lorasurgeon.errors import LorasurgeonError, Option

Method = Literal["auto", "exact", "randomized"]
METHODS: tuple[Method, ...] = ("auto", "exact", "randomized")
EXACT_BELOW = 1024
MAX_POWER_ITERS, CONVERGENCE_TOL = 12, 1e-3


@dataclass(frozen=True)
class RankRule:
    """How a matrix's rank is chosen (`rank`, or the smallest keeping `energy` of ‖ΔW‖², at most `max_rank`), by
    which SVD `method`, and the extra ranks whose error to report (`curve`); `validate` names the first bad one."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    method: str = "auto"
    curve: tuple[int, ...] = ()
    seed: int = 0

    def validate(self, dry_run: bool) -> None:
        if (self.rank is None) == (self.energy is None) and not (self.curve and dry_run and self.energy is None):
            raise LorasurgeonError(
                "give exactly one of ", Option("rank", metavar="R"), " or ", Option("energy", metavar="F"), " (or ",
                Option("curve"),
                " with ", Option("dry_run", flag=True), ")",
            )  # fmt: skip
        if self.rank is not None and self.rank < 1:
            raise LorasurgeonError(Option("rank", self.rank), ": must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorasurgeonError(Option("energy", self.energy), ": must be in (0, 1]")
        if self.max_rank is not None and (self.energy is None or self.max_rank < 1):
            raise LorasurgeonError(Option("max_rank", self.max_rank), ": needs energy and must be at least 1")
        if self.method not in METHODS:
            raise LorasurgeonError(Option("method", self.method), f": expected one of {', '.join(METHODS)}")
        if any(r < 1 for r in self.curve):
            raise LorasurgeonError(Option("curve", ",".join(map(str, self.curve))), ": ranks must be at least 1")

    def sketch_rank(self, shape: tuple[int, int]) -> int:
        """How many singular triplets to compute for a matrix: the rank bound, the curve's largest rank."""
        bound = self.rank or self.max_rank or min(shape)
        return min(max(bound, *self.curve), min(shape)) if self.curve else min(bound, min(shape))


@dataclass(frozen=True)
class MatrixResult:
    """One extracted matrix: its rank, how it was computed, and how much of ΔW the factors keep."""

    module: str
    tensor: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    method: str  # "exact" | "randomized" | "exact (fallback)"
    energy: float  # captured fraction of ‖ΔW‖²_F
    error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured
    norm: float  # ‖ΔW‖_F
    curve: tuple[float, ...] = ()  # relative error at each rank of the rule's curve
    spectrum: tuple[float, ...] = field(default=(), repr=False)  # the singular values computed

    @property
    def adapter_params(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1])


def decompose(
    delta: torch.Tensor, rule: RankRule, generator: torch.Generator, *, module: str, tensor: str, kind: str
) -> tuple[MatrixResult, torch.Tensor, torch.Tensor]:
    """Factorise one (out, in) delta of `tensor` (module `module`, of `kind`): (result, B (out, r), A (r, in)) on
    the CPU, with B @ A ≈ ΔW and the singular values split evenly between them."""
    shape = (delta.shape[0], delta.shape[1])
    norm = float(torch.linalg.matrix_norm(delta).item())
    u, s, vh, method = svd(delta, rule, rule.sketch_rank(shape), generator)
    if rule.rank is not None:
        rank = rule.rank
    elif rule.energy is not None:
        rank = min(linalg.energy_rank(s, norm**2, rule.energy), rule.max_rank or len(s))
    else:  # a curve on a dry run without a rank: report the largest curve rank
        rank = min(max(rule.curve), len(s))
    b, a = linalg.split_factors(u, s, vh, rank, 1.0)  # scale 1 here; write_adapter folds lora_alpha / r in
    residual = float(torch.linalg.matrix_norm(torch.addmm(delta, b, a, alpha=-1.0)).item())
    error = residual / norm
    result = MatrixResult(
        module=module,
        tensor=tensor,
        kind=kind,
        shape=shape,
        rank=rank,
        method=method,
        energy=1.0 - error**2,
        error=error,
        norm=norm,
        curve=tuple(linalg.relative_errors(s, norm**2, list(rule.curve), complete=len(s) == min(shape))),
        spectrum=tuple(s.tolist()),
    )
    return result, b.cpu(), a.cpu()


def svd(
    delta: torch.Tensor, rule: RankRule, sketch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, σ, Vᵀ, method used), by the rule's method and the rule in the module docstring."""
    oversample = max(sketch, 16)
    method = rule.method
    if method == "auto":
        small = min(delta.shape) <= EXACT_BELOW or 4 * (sketch + oversample) > min(delta.shape)
        unbounded = rule.energy is not None and rule.max_rank is None
        method = "exact" if small or unbounded else "randomized"
    if method == "randomized" and sketch < min(delta.shape):
        u, s, vh, converged = linalg.randomized_svd(
            delta, sketch, oversample, MAX_POWER_ITERS, CONVERGENCE_TOL, generator
        )
        if converged:
            return u, s, vh, "randomized"
        method = "exact (fallback)"
    u, s, vh = linalg.exact_svd(delta)
    return u, s, vh, "exact" if method == "randomized" else method
