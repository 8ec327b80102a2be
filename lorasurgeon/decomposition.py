"""Truncated SVD of one ΔW matrix, by the rule that picks its rank and the method that computes it.

SVD methods, and the error each guarantees (error = ‖ΔW − B·A‖_F, measured on the factors written):
- exact: torch.linalg.svd, the Eckart–Young optimum √(Σ_{i>r} σ_i²).
- randomized: a Gaussian range finder of r + max(r, 16) columns, refined by power iterations until one more
  lowers the rank-r error² by less than 0.1 % (`linalg.randomized_svd`), at most 12; a matrix that has not
  converged by then falls back to exact. Convergence of subspace iteration is geometric, so the 0.1 % test
  bounds what is left to gain: measured ≤ 1.001 × the optimum on power-law spectra (tests/test_extract.py,
  bench/results/extract.md), where one iteration without oversampling misses it by 5-16 %.
- auto: whichever is cheaper, by measurement (bench/svd_crossover.py, bench/results/svd_crossover.md):
  randomized once min(m, n) is at least RANDOMIZED_FROM times the sketch's r + max(r, 16) columns, exact below
  that, and exact for an energy rule without a max rank (the rank is unbounded). The exact SVD costs about
  m·n·min(m, n), the sketch about m·n·(its columns)·(2·iterations + 1), so their ratio is what decides:
  randomized lost at 4 and below and won from 5.3 on, 12-60x at 1024 wide and ranks 8-16. The guarantee is
  the method's, not auto's: whichever runs, the error is ≤ 1.01 × the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorasurgeon import linalg
from lorasurgeon.rank_rule import RankRule

RANDOMIZED_FROM = 5  # randomized when min(m, n) ≥ this × the sketch's columns (measured crossover: 4-5)
MAX_POWER_ITERS, CONVERGENCE_TOL = 12, 1e-3


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
        cheaper = min(delta.shape) >= RANDOMIZED_FROM * (sketch + oversample)
        unbounded = rule.energy is not None and rule.max_rank is None
        method = "randomized" if cheaper and not unbounded else "exact"
    if method == "randomized" and sketch < min(delta.shape):
        u, s, vh, converged = linalg.randomized_svd(
            delta, sketch, oversample, MAX_POWER_ITERS, CONVERGENCE_TOL, generator
        )
        if converged:
            return u, s, vh, "randomized"
        method = "exact (fallback)"
    u, s, vh = linalg.exact_svd(delta)
    return u, s, vh, "exact" if method == "randomized" else method
