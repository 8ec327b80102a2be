"""Exact algebra on factored deltas ΔW = s·B·A, never forming the dense (m, n) ΔW.

B is (m, r) and A is (r, n), PEFT's layout (conv kernels and embeddings are flattened / transposed by the
caller). The one idea (ANCHORS-2.md, Appendix A): with B = Q_B·R_B and Aᵀ = Q_A·R_A,

    ΔW = Q_B · (s·R_B·R_Aᵀ) · Q_Aᵀ,

so the SVD of the small core M = s·R_B·R_Aᵀ gives the SVD of ΔW: U = Q_B·U_M, Vᵀ = V_Mᵀ·Q_Aᵀ, the same σ.
Cost O((m + n)·r²) instead of O(m·n·min(m, n)); truncating to k is exactly the Eckart–Young optimum, with the
exact error √(Σ_{i>k} σᵢ²) read off the spectrum. Sums of adapters are exact by stacking (`stack`).

Precision: everything here runs in fp64. The factors are thin, so the up-cast costs O((m + n)·r) memory and
about 1-2x the fp32 time of the QRs, and it keeps σ accurate to ~1e-15·σ₁ rather than ~1e-7: the rank rules
and the reported errors look at the spectrum's tail, where fp32 rounding would be the whole answer. Results
stay fp64; the caller rounds once, to the dtype it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorasurgeon.errors import MismatchError


def core_svd(
    b: torch.Tensor, a: torch.Tensor, scale: float, keep: int | Callable[[torch.Tensor], int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ, Vᵀ) with scale·B·A = U·diag(σ)·Vᵀ exactly up to fp64 rounding, σ descending and ≥ 0.

    B is (m, r), A is (r, n); σ is (k,) with k = min(m, n, r): every singular value of ΔW that can be nonzero,
    so σ is ΔW's complete spectrum (a rank-deficient or zero factor gives zeros in it; r = 0 gives k = 0).
    U is (m, j) and Vᵀ (j, n) for the first j = min(keep, k) singular vectors (all k without `keep`; `keep`
    may be a function of σ, e.g. a rank rule): a caller that truncates to rank j pays O((m + n)·r·j) for the
    vectors, not O((m + n)·r²).
    Steps, all fp64: Householder QR of B and of Aᵀ (geqrf: backward stable, so the implicit Q_B and Q_A are
    orthonormal to ~1e-16 however ill-conditioned the factors are, and never formed); the core product; LAPACK's
    SVD of the (≤ r)×(≤ r) core; the reflectors applied to the kept columns of its vectors (ormqr).
    A negative scale goes into the core, so σ stays non-negative.

    Example: u, s, vh = core_svd(b, a, 2.0); torch.allclose(u * s @ vh, 2.0 * b.double() @ a.double())
    and, for a rule: u, s, vh = core_svd(b, a, 2.0, keep=lambda s: choose_rank(s, rule)); k = u.shape[1]
    """
    reflectors_b, tau_b, r_b = _householder(b.double())  # R_B (p, r), p = min(m, r)
    reflectors_a, tau_a, r_a = _householder(a.double().T)  # R_A (q, r), q = min(n, r)
    core = (r_b @ r_a.T).mul_(scale)  # (p, r) @ (r, q) -> (p, q)
    u_core, sigma, vh_core = torch.linalg.svd(core, full_matrices=False)  # (p, k), (k,), (k, q)
    j = min(len(sigma), len(sigma) if keep is None else keep(sigma) if callable(keep) else keep)
    u = apply_q(reflectors_b, tau_b, u_core[:, :j])  # Q_B (m, p) @ (p, j) -> (m, j)
    v = apply_q(reflectors_a, tau_a, vh_core[:j].T)  # Q_A (n, q) @ (q, j) -> (n, j)
    return u, sigma, v.T


def _householder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reflectors, tau, R) of the QR of a (rows, r) matrix: R is (min(rows, r), r), upper triangular."""
    reflectors, tau = torch.geqrf(x)
    return reflectors, tau, reflectors[: min(x.shape)].triu()


def apply_q(reflectors: torch.Tensor, tau: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Q·y for the reduced Q (rows, p) of `_householder`, y (p, j): the full Q applied to y padded with zeros."""
    padded = y.new_zeros(reflectors.shape[0], y.shape[1])
    padded[: y.shape[0]] = y
    if padded.numel() == 0:
        return padded
    return torch.ormqr(reflectors, tau, padded)


def spectrum(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """σ of scale·B·A (fp64, descending, length min(m, n, r)) without forming Q_B, Q_A or any vector.

    For rules that look at every module's spectrum before choosing any rank (the global `--params` budget):
    nothing of size m or n is kept between the passes, and the second pass calls `core_svd(..., keep=k)`.
    """
    r_b = _householder(b.double())[2]  # (p, r)
    r_a = _householder(a.double().T)[2]  # (q, r)
    sigma: torch.Tensor = torch.linalg.svdvals((r_b @ r_a.T).mul_(scale))
    return sigma


def frobenius(b: torch.Tensor, a: torch.Tensor, scale: float) -> float:
    """‖scale·B·A‖_F = ‖scale·R_B·R_Aᵀ‖_F (Q_B, Q_A orthonormal), in fp64, without forming B·A.

    Unlike the Gram route (tr(BᵀB·AAᵀ)), the QR route does not square the condition number: a difference
    that nearly cancels (B = [B₁, −B₁ + E]) is measured to ~1e-16 of its parts, not ~1e-8.
    """
    r_b = _householder(b.double())[2]
    r_a = _householder(a.double().T)[2]
    return abs(scale) * float(torch.linalg.matrix_norm(r_b @ r_a.T).item())


def stack(terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B*, A*) with B*·A* = Σ cᵢ·Bᵢ·Aᵢ exactly: B* = [c₁B₁ … c_nB_n] (m, Σrᵢ), A* = [A₁; …; A_n] (Σrᵢ, n).

    `terms` are (Bᵢ, Aᵢ, cᵢ) with cᵢ = weightᵢ·scaleᵢ; the product has no cross terms Bᵢ·Aⱼ (what averaging A
    and B separately adds), any weights (negative ones included) and any ranks. fp64, each cᵢ·Bᵢ rounded once.
    This is PEFT's `cat` combination (which puts cᵢ on A instead: the same product) at scale 1.
    Raises MismatchError when the terms disagree on m or n (the planner should have refused them by name).
    """
    if not terms:
        raise MismatchError("there is nothing to stack: no adapter has this module")
    rows, columns = terms[0][0].shape[0], terms[0][1].shape[1]
    for b, a, _ in terms:
        if b.shape[0] != rows or a.shape[1] != columns or b.shape[1] != a.shape[0]:
            raise MismatchError(
                f"a term of shape B {tuple(b.shape)}, A {tuple(a.shape)} does not fit the ({rows}, {columns}) "
                "delta of the first adapter"
            )
    b_star = torch.cat([b.double() * c for b, _, c in terms], dim=1)  # (m, Σr)
    a_star = torch.cat([a.double() for _, a, _ in terms], dim=0)  # (Σr, n)
    return b_star, a_star


class Factored(NamedTuple):
    """A rank-k approximation B·A (at scale 1) of a ΔW, with the complete spectrum σ of that ΔW."""

    b: torch.Tensor  # (m, k)
    a: torch.Tensor  # (k, n)
    sigma: torch.Tensor  # (K,), K ≥ k, descending


def truncate(u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int) -> Factored:
    """The best rank-`rank` factors of U·diag(σ)·Vᵀ: B = U_k·diag(√σ_k), A = diag(√σ_k)·V_kᵀ, at scale 1.

    The singular values are split evenly (as `linalg.split_factors` does for extract): each factor then carries
    √σ, so neither under- nor overflows fp16/bf16 where the other would, and B·A is ΔW's rank-k truncation at
    scale 1. The writer sets alpha so that the output's scale is 1 (alpha = k, or √k for rsLoRA). U and Vᵀ
    need min(rank, len σ) vectors (`core_svd(..., keep=rank)`); a rank above len(σ) keeps all of σ (the caller
    refuses ranks above the input's by name).
    """
    k = min(rank, len(sigma))
    root = sigma[:k].sqrt()
    return Factored(u[:, :k] * root, root[:, None] * vh[:k], sigma)  # (m, k), (k, n)


def resize(b: torch.Tensor, a: torch.Tensor, scale: float, rank: int) -> Factored:
    """scale·B·A cut to its best rank-`rank` factors (Eckart–Young), via `core_svd` and `truncate`."""
    return truncate(*core_svd(b, a, scale, keep=rank), rank)


def tail_energies(sigma: torch.Tensor) -> list[float]:
    """tails[k] = Σ_{i>k} σᵢ² for k = 0..len(σ), summed from the small end so that tiny tails stay exact."""
    squares = sigma.double().square()
    tails = torch.flip(torch.cumsum(torch.flip(squares, [0]), 0), [0]).tolist()
    return [*tails, 0.0]


@dataclass(frozen=True)
class ModuleRow:
    """One row of the resize / combine table: ranks, and what the new rank keeps of the module's ΔW."""

    name: str
    old_rank: int  # the input's rank (for a combination, the stacked Σrᵢ)
    new_rank: int
    retained: float  # Σ_{i≤k} σᵢ² / Σ σᵢ², the fraction of ‖ΔW‖²_F kept (1 for a zero ΔW)
    error: float  # ‖ΔW − B'A'‖_F / ‖ΔW‖_F = √(Σ_{i>k} σᵢ² / Σ σᵢ²), exact from the spectrum (0 for a zero ΔW)


def module_row(name: str, old_rank: int, sigma: torch.Tensor, new_rank: int) -> ModuleRow:
    """The table row of a module whose ΔW has the complete spectrum `sigma`, kept at `new_rank`."""
    tails = tail_energies(sigma)
    total, tail = tails[0], tails[min(new_rank, len(sigma))]
    if total <= 0:
        return ModuleRow(name, old_rank, new_rank, 1.0, 0.0)
    return ModuleRow(name, old_rank, new_rank, (total - tail) / total, (tail / total) ** 0.5)
