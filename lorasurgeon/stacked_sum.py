"""Σ cᵢ·Bᵢ·Aᵢ over a stream of terms (federated clients, many adapters), exact, one term in memory at a time.

The sum is held as its stacked factors P* = [P₁ … P_N] (L, R) and Q* = [Q₁; …; Q_N] (R, S), R = Σ rᵢ, oriented
so that the larger side L = max(m, n) is P (B's side, or Aᵀ's when n > m), with ΔW′ = P*·diag(c)·Q* = ΔW or ΔWᵀ:

- the larger side is kept as the caller gave it (each client's own tensor, in its own dtype: fp32 or bf16
  input costs 4 or 2 bytes per number, never an fp64 copy), and only its R factor is ever formed, by a
  Householder QR of one block of its rows at a time (TSQR, stable): a (2·R, R) buffer, overwritten in place;
- the smaller side is copied once into one preallocated fp64 buffer whose rows are the Qᵢ: its transpose (S, R)
  is Fortran-ordered, which is what LAPACK's geqrf overwrites in place, so its QR costs no second copy (geqrf on
  a C-ordered matrix copies it, ~2-4 times its size);
- the cᵢ = weightᵢ·scaleᵢ stay apart, in the core: ΔW′ = Q_P·(R_P·diag(c)·R_Qᵀ)·Q_Qᵀ, so no factor is rounded
  by a weight. The SVD of that small core gives σ and V′ = Q_Q·V_core (ormqr), and the other side needs no Q_P:
  ΔW′·V′_k = P*·diag(c)·R_Qᵀ·V_core,k, one product over the clients' own P.

Memory: (bytes of one number of the larger side's dtype · L + 8·S) per stacked rank, plus the R×R core, its SVD
and the TSQR buffer. It is flat in the number of modules and never holds the clients themselves; it cannot be
flat in the number of clients below saturation: Σ cᵢBᵢAᵢ of N generic rank-r clients has rank N·r until that
reaches min(m, n), and any exact one-pass method must hold it (a later client could cancel any part of it).
Past saturation (R > 2·min(m, n)) the stack is re-compressed exactly to its SVD (rank ≤ min(m, n)), in fp64,
and memory stays below (8·(L + S))·(2·min(m, n) + r) bytes, however many clients come.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.factored import Factored, apply_q

Keep = int | Callable[[torch.Tensor], int] | None


class StackedSum:
    """An exact running Σ cᵢ·Bᵢ·Aᵢ of (m, n) deltas, B (m, r), A (r, n); results in fp64.

    Mutable on purpose: the fp64 buffer is preallocated (pass `capacity` = Σrᵢ when the planner knows it, from
    the headers), so N additions copy each client's smaller factor once. The larger factor is held by reference
    (the caller must not modify it in place afterwards).

    Example: s = StackedSum(m, n, capacity=2 * r); s.add(b1, a1, 0.5); s.add(b2, a2, 0.5); u, σ, vh = s.svd()
    """

    def __init__(self, rows: int, columns: int, capacity: int = 64, device: torch.device | None = None) -> None:
        self.rows, self.columns = rows, columns
        self._flip = columns > rows  # then P = Aᵀ (n, r) is the larger side and Q = Bᵀ (r, m)
        self._long, self._short = max(rows, columns), min(rows, columns)
        self._saturation = 2 * self._short  # stacked columns past which a re-compression pays off
        self._device = device
        capacity = max(1, min(capacity, self._saturation))
        self._wide = torch.zeros(capacity, self._short, dtype=torch.float64, device=device)  # rows: Qᵢ (rᵢ, S)
        self._tall: list[torch.Tensor] = []  # Pᵢ (L, rᵢ), as given
        self._coefficients: list[float] = []
        self._used = 0

    @property
    def stacked_rank(self) -> int:
        """Columns of the stack now held (≥ the sum's rank; ≤ 2·min(m, n) + the largest term's rank)."""
        return self._used

    def add(self, b: torch.Tensor, a: torch.Tensor, c: float) -> None:
        """Fold c·B·A into the sum (B, A of any float dtype; B or A kept as it is, the other copied to fp64)."""
        rank = self._check(b, a)
        self._make_room(rank)
        tall, wide = (a.T, b.T) if self._flip else (b, a)  # (L, r), (r, S)
        self._wide[self._used : self._used + rank] = wide
        self._tall.append(tall.to(self._device) if self._device is not None else tall)
        self._coefficients.append(float(c))
        self._used += rank

    def svd(self, keep: Keep = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, σ, Vᵀ) of the sum, the sum left as it is: σ (k,) its full spectrum, k = min(m, n, stacked rank),
        with the first `keep` (default all k; a function of σ, e.g. a rank rule) singular vectors, U (m, keep)
        and Vᵀ (keep, n). U's columns for σᵢ = 0 are 0 (U·diag(σ)·Vᵀ is still the sum)."""
        w, sigma, v, _ = _decompose(self._wide[: self._used].clone(), self._tall, self._coefficients, keep)
        u = w / torch.where(sigma[: w.shape[1]] > 0, sigma[: w.shape[1]], 1.0)  # (L, j)
        return (v, sigma, u.T) if self._flip else (u, sigma, v.T)

    def truncated(self, keep: Keep, naive: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[Factored, float]:
        """The best rank-`keep` factors of the sum at scale 1 (B = U_k·√σ_k, A = √σ_k·V_kᵀ; `factored.truncate`),
        and, given FedIT's `naive` (B̄, Ā), ‖B̄·Ā − sum‖_F / ‖sum‖_F (else nan). Consumes the sum: its QR is done
        in place, so it must not be used afterwards."""
        extra = 0 if naive is None else self._check(*naive)
        if naive is not None:
            self._make_room(extra)
            tall, wide = (naive[1].T, naive[0].T) if self._flip else naive
            self._wide[self._used : self._used + extra] = wide
            self._tall.append(tall)
        wide_rows = self._wide[: self._used + extra]
        coefficients = self._coefficients + ([0.0] if naive is not None else [])
        w, sigma, v, naive_error = _decompose(wide_rows, self._tall, coefficients, keep, naive is not None)
        self._used, self._tall, self._coefficients = 0, [], []
        root = sigma[: w.shape[1]].sqrt()
        b = w / torch.where(root > 0, root, 1.0)  # (L, j): ΔW′·V_j / √σ_j
        a = (v * root).T  # (j, S)
        return (Factored(a.T, b.T, sigma) if self._flip else Factored(b, a, sigma)), naive_error

    def frobenius(self, b: torch.Tensor | None = None, a: torch.Tensor | None = None, c: float = 1.0) -> float:
        """‖sum + c·B·A‖_F (just ‖sum‖_F without B, A), through the QR core; the sum is left unchanged."""
        tall, wide, coefficients = list(self._tall), self._wide[: self._used], list(self._coefficients)
        if b is not None and a is not None:
            self._check(b, a)
            extra_tall, extra_wide = (a.T, b.T) if self._flip else (b, a)
            tall.append(extra_tall)
            wide = torch.cat([wide, extra_wide.to(wide)])
            coefficients.append(c)
        r_p, r_q, _, _ = _factorise(wide.clone(), tall)
        core = (r_p * _repeated(tall, coefficients, wide)) @ r_q.T  # R_P·diag(c)·R_Qᵀ, (p, q)
        return float(torch.linalg.matrix_norm(core).item())

    def _check(self, b: torch.Tensor, a: torch.Tensor) -> int:
        if b.dim() != 2 or a.dim() != 2 or b.shape[0] != self.rows or a.shape[1] != self.columns:
            raise MismatchError(
                f"a term of shape B {tuple(b.shape)}, A {tuple(a.shape)} does not fit the ({self.rows}, "
                f"{self.columns}) sum it is added to"
            )
        if b.shape[1] != a.shape[0]:
            raise MismatchError(f"a term's B has rank {b.shape[1]} but its A has rank {a.shape[0]}")
        return int(b.shape[1])

    def _make_room(self, rank: int) -> None:
        """Re-compress past saturation, then grow the buffer (doubling) if `rank` more rows do not fit."""
        if self._used + rank > self._saturation and self._used > self._short:
            w, sigma, v, _ = _decompose(self._wide[: self._used], self._tall, self._coefficients, None)
            kept = len(sigma)  # exact: rank ≤ min(m, n) holds all of it
            self._wide[:kept] = v.T  # (k, S); the buffer's QR was done in place, these rows replace it
            self._tall, self._coefficients, self._used = [w], [1.0], kept  # W = ΔW′·V = U·diag(σ), (L, k)
        capacity, need = self._wide.shape[0], self._used + rank
        if need > capacity:  # doubling, but never past saturation plus this term
            capacity = min(max(2 * capacity, need), max(need, self._saturation + rank))
            grown = self._wide.new_zeros(capacity, self._short)
            grown[: self._used] = self._wide[: self._used]
            self._wide = grown


def _decompose(
    wide: torch.Tensor, tall: Sequence[torch.Tensor], coefficients: Sequence[float], keep: Keep, naive: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(W (L, j) = ΔW′·V_j = U_j·diag(σ_j), σ (k,) the full spectrum, V_j (S, j), FedIT's relative error or nan)
    of ΔW′ = P*·diag(c)·Q*, `wide` = Q* (R, S) overwritten. With `naive`, the last term is B̄·Ā, held at c = 0
    in the sum and at −1 in the difference ‖B̄·Ā − sum‖_F = ‖R_P·diag(−c, 1)·R_Qᵀ‖_F."""
    r_p, r_q, reflectors, tau = _factorise(wide, tall)
    c = _repeated(tall, coefficients, wide)  # (R,)
    core = (r_p * c) @ r_q.T  # (p, R)·(R,) @ (R, q) -> (p, q)
    naive_error = math.nan
    if naive:
        difference = c.neg()
        difference[c.numel() - int(tall[-1].shape[1]) :] = 1.0
        norm = float(torch.linalg.matrix_norm(core).item())
        off = float(torch.linalg.matrix_norm((r_p * difference) @ r_q.T).item())
        naive_error = off / norm if norm > 0 else 0.0 if off == 0 else math.inf
    del r_p  # R×R numbers fewer at the SVD, the peak
    _, sigma, vh_core = torch.linalg.svd(core, full_matrices=False)  # (k,), (k, q)
    j = min(len(sigma), len(sigma) if keep is None else keep(sigma) if callable(keep) else keep)
    v = apply_q(reflectors, tau, vh_core[:j].T)  # Q_Q (S, q) @ (q, j) -> (S, j)
    z = c[:, None] * (r_q.T @ vh_core[:j].T)  # diag(c)·R_Qᵀ·V_core,j: (R, q) @ (q, j) -> (R, j)
    w = wide.new_zeros(int(tall[0].shape[0]) if tall else 0, j)
    offset = 0
    for p in tall:  # ΔW′·V_j = Σᵢ Pᵢ·zᵢ: (L, rᵢ) @ (rᵢ, j), one client's factor in fp64 at a time
        rank = int(p.shape[1])
        if bool(c[offset : offset + rank].any()):
            w += p.to(w) @ z[offset : offset + rank]
        offset += rank
    return w, sigma, v, naive_error


def _repeated(tall: Sequence[torch.Tensor], coefficients: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """c repeated over each term's rᵢ columns: (R,) in fp64."""
    parts = [torch.full((int(p.shape[1]),), ci, dtype=torch.float64) for p, ci in zip(tall, coefficients, strict=True)]
    return torch.cat(parts).to(like.device) if parts else like.new_zeros(0)


def _factorise(
    wide: torch.Tensor, tall: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R_P (p, R), R_Q (q, R), reflectors, tau): TSQR of P* = [P₁ … P_N], and the QR of Q*ᵀ done in place on
    `wide` (R, S), whose transpose (S, R) is Fortran-ordered: it holds Q_Q's Householder reflectors afterwards."""
    reflectors = wide.T  # (S, R)
    tau = wide.new_empty(min(reflectors.shape))
    if wide.numel():
        torch.geqrf(reflectors, out=(reflectors, tau))
    r_q = reflectors[: min(reflectors.shape)].triu()  # (q, R)
    return _tsqr_r(tall, wide.shape[0], wide), r_q, reflectors, tau


def _tsqr_r(tall: Sequence[torch.Tensor], rank: int, like: torch.Tensor, step: int | None = None) -> torch.Tensor:
    """R of the (L, rank) stack [P₁ … P_N] (fp64, (min(L, rank), rank)) from blocks of its rows: each block under
    the running R in one (≤ rank + step, rank) Fortran-ordered buffer, QR'd in place (TSQR)."""
    rows = int(tall[0].shape[0]) if tall else 0
    if rank == 0 or rows == 0:
        return like.new_zeros(0, rank)
    step = step or max(rank, 256)
    buffer = like.new_zeros(rank, rank + step)  # its transpose (rank + step, rank) is Fortran-ordered
    tau = like.new_empty(rank)
    held = 0  # rows of the running R at the top of the buffer's transpose
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        column = 0
        for p in tall:  # the block's rows of P*, transposed, under the running R
            buffer[column : column + p.shape[1], held : held + stop - start] = p[start:stop].T
            column += int(p.shape[1])
        view = buffer[:, : held + stop - start].T  # (held + block rows, rank)
        count = min(view.shape)
        torch.geqrf(view, out=(view, tau[:count]))
        r = view[:count].triu()  # (count, rank)
        buffer[:, :count] = r.T
        held = count
    return buffer[:, :held].T.triu()  # (p, rank)


def naive_relative_error(exact: StackedSum, b_mean: torch.Tensor, a_mean: torch.Tensor) -> float:
    """‖B̄·Ā − Σ wᵢsᵢBᵢAᵢ‖_F / ‖Σ wᵢsᵢBᵢAᵢ‖_F: what FedIT's separate averaging of A and B costs, dense-free.

    `exact` holds Σ wᵢ·sᵢ·Bᵢ·Aᵢ; B̄ = Σ wᵢ·sᵢ·Bᵢ and Ā = Σ wᵢ·Aᵢ are the running means (scale folded into B, so
    B̄·Ā is FedIT's s·B̄·Ā when every client has the same scale s, as FedIT assumes). 0 when both are zero,
    inf when only the exact sum is. Leaves `exact` as it is (`StackedSum.truncated(keep, naive=...)` gives the
    same number from the QR it does anyway).
    """
    norm = exact.frobenius()
    difference = exact.frobenius(b_mean, a_mean, -1.0)
    if norm == 0:
        return 0.0 if difference == 0 else math.inf
    return difference / norm


def fedit_error(terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float]) -> float:
    """`naive_relative_error` for one module's clients (Bᵢ, Aᵢ, scaleᵢ) with weights wᵢ, all in memory.

    FedIT's average needs one rank: raises UnsupportedError when the clients' ranks differ, MismatchError
    when the weights do not match the clients.
    """
    if len(terms) != len(weights) or not terms:
        raise MismatchError(f"{len(weights)} weights for {len(terms)} clients")
    ranks = sorted({int(b.shape[1]) for b, _, _ in terms})
    if len(ranks) > 1:
        raise UnsupportedError(f"FedIT averages A and B of one rank; these clients have ranks {ranks}")
    b0, a0, _ = terms[0]
    exact = StackedSum(b0.shape[0], a0.shape[1], capacity=(len(terms) + 1) * ranks[0])
    b_mean = torch.zeros(b0.shape, dtype=torch.float64, device=b0.device)
    a_mean = torch.zeros(a0.shape, dtype=torch.float64, device=a0.device)
    for (b, a, scale), w in zip(terms, weights, strict=True):
        exact.add(b, a, w * scale)
        b_mean += (w * scale) * b.double()
        a_mean += w * a.double()
    return naive_relative_error(exact, b_mean, a_mean)
