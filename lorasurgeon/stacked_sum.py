"""Σ cᵢ·Bᵢ·Aᵢ over a stream of terms (federated clients, many adapters), exact, one term in memory at a time.

The sum is held as one stacked pair (B*, A*) in preallocated fp64 buffers: adding a client copies its
(m, r) and (r, n) factors in and drops them. What memory can and cannot be flat in:

- Never the raw clients: only the module being aggregated, one client's factors at a time beyond the sum,
  so peak memory does not grow with the number of modules times the number of clients.
- Not the exact sum itself below saturation: Σᵢ cᵢ·Bᵢ·Aᵢ of N generic rank-r clients has rank N·r until
  that reaches min(m, n), and any one-pass exact method must hold it (a later client could cancel any part
  of it), i.e. ~(m + n)·rank numbers. That is what the stack holds.
- Flat past saturation: once the stack would exceed 2·min(m, n) columns, it is re-compressed in place,
  exactly, to its core SVD (rank ≤ min(m, n)), and stacking continues. So the buffers never exceed
  (m + n)·(2·min(m, n) + r) numbers (r the largest term's rank), however many clients come.

The incremental Gram-Schmidt alternative (keep Q_B, Q_A and the core, extend them per client) needs the same
(m + n)·rank memory and loses orthogonality on nearly dependent clients; one Householder QR of the stack
at the end (and at each re-compression) costs the same flops and stays backward stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.factored import core_svd, frobenius


class StackedSum:
    """An exact running Σ cᵢ·Bᵢ·Aᵢ of (m, n) deltas, B (m, r), A (r, n), in fp64.

    Mutable on purpose: its buffers are preallocated (pass `capacity` = Σrᵢ when the planner knows it, from
    the headers) so that N additions copy each client once, instead of rebuilding a growing stack N times.

    Example: s = StackedSum(m, n, capacity=2 * r); s.add(b1, a1, 0.5); s.add(b2, a2, 0.5); u, σ, vh = s.svd()
    """

    def __init__(self, rows: int, columns: int, capacity: int = 64, device: torch.device | None = None) -> None:
        self.rows, self.columns = rows, columns
        self._saturation = 2 * min(rows, columns)  # stacked columns past which a re-compression pays off
        capacity = max(1, min(capacity, self._saturation))
        self._b = torch.zeros(rows, capacity, dtype=torch.float64, device=device)  # (m, capacity)
        self._a = torch.zeros(capacity, columns, dtype=torch.float64, device=device)  # (capacity, n)
        self._used = 0

    @property
    def stacked_rank(self) -> int:
        """Columns of the stack now held (≥ the sum's rank; ≤ 2·min(m, n) + the largest term's rank)."""
        return self._used

    def add(self, b: torch.Tensor, a: torch.Tensor, c: float) -> None:
        """Fold c·B·A into the sum (B, A of any float dtype; rounded once, c·B in fp64)."""
        rank = self._check(b, a)
        self._make_room(rank)
        self._b[:, self._used : self._used + rank] = b.double() * c
        self._a[self._used : self._used + rank] = a.double()
        self._used += rank

    def svd(self, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`core_svd` of the sum: σ (k,) its full spectrum, k = min(m, n, stacked rank), with the first `keep`
        (default all k) singular vectors, U (m, keep) and Vᵀ (keep, n)."""
        return core_svd(self._b[:, : self._used], self._a[: self._used], 1.0, keep)

    def frobenius(self, b: torch.Tensor | None = None, a: torch.Tensor | None = None, c: float = 1.0) -> float:
        """‖sum + c·B·A‖_F (just ‖sum‖_F without B, A), through the QR core; the sum is left unchanged."""
        if b is None or a is None:
            return frobenius(self._b[:, : self._used], self._a[: self._used], 1.0)
        rank = self._check(b, a)
        self._make_room(rank)
        end = self._used + rank
        self._b[:, self._used : end] = b.double() * c  # scratch columns past the sum: not counted in `_used`
        self._a[self._used : end] = a.double()
        return frobenius(self._b[:, :end], self._a[:end], 1.0)

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
        """Re-compress past saturation, then grow the buffers (doubling) if `rank` more columns do not fit."""
        if self._used + rank > self._saturation and self._used > min(self.rows, self.columns):
            u, sigma, vh = self.svd()  # exact: rank ≤ min(m, n) holds all of it
            kept = len(sigma)
            self._b[:, :kept] = u * sigma  # (m, k)
            self._a[:kept] = vh  # (k, n)
            self._used = kept
        capacity, need = self._b.shape[1], self._used + rank
        if need > capacity:  # doubling, but never past saturation plus this term
            capacity = min(max(2 * capacity, need), max(need, self._saturation + rank))
            self._b = torch.cat([self._b[:, : self._used], self._b.new_zeros(self.rows, capacity - self._used)], 1)
            self._a = torch.cat([self._a[: self._used], self._a.new_zeros(capacity - self._used, self.columns)], 0)


def naive_relative_error(exact: StackedSum, b_mean: torch.Tensor, a_mean: torch.Tensor) -> float:
    """‖B̄·Ā − Σ wᵢsᵢBᵢAᵢ‖_F / ‖Σ wᵢsᵢBᵢAᵢ‖_F: what FedIT's separate averaging of A and B costs, dense-free.

    `exact` holds Σ wᵢ·sᵢ·Bᵢ·Aᵢ; B̄ = Σ wᵢ·sᵢ·Bᵢ and Ā = Σ wᵢ·Aᵢ are the running means (scale folded into B, so
    B̄·Ā is FedIT's s·B̄·Ā when every client has the same scale s, as FedIT assumes). 0 when both are zero,
    inf when only the exact sum is.
    """
    norm = exact.frobenius()
    difference = exact.frobenius(b_mean, a_mean, -1.0)
    if norm == 0:
        return 0.0 if difference == 0 else float("inf")
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
