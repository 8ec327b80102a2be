"""Pure maths of one block of a blockwise merge (linalg.merge_blockwise): a term's scale folded into A where
that is exact, and a block of rows of a term's ΔW. Shapes follow PEFT: A is (r, in), B is (out, r).
"""

from __future__ import annotations

import math

import torch

Term = tuple[torch.Tensor, torch.Tensor, float, bool]  # (A, B, scale, transpose)


def folded(term: Term, sign: int) -> Term:
    """(A, B, scale, transpose) with sign · scale in A when that is exact, else in scale: multiplying A by ±2^k
    (k ≥ 0) changes only exponents, so every product and sum of B @ A is the unfolded one times ±2^k, bit for bit
    (but for products below fp32's normal range, 2^-126), and the pass that scaled each block is saved."""
    a, b, scale, transpose = term
    if scale >= 1 and math.frexp(scale)[0] == 0.5:
        return (a * (sign * scale) if sign * scale != 1 else a), b, 1.0, transpose
    return a, b, sign * scale, transpose


def delta_rows(factors: Term, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of scale · (B @ A), or of its transpose, in fp32 (in `buffer` when given and not
    transposed)."""
    a, b, scale, transpose = factors
    if transpose:
        rows = (b @ a[:, start:stop]).T
    elif buffer is not None:
        rows = torch.mm(b[start:stop], a, out=buffer[: (stop - start) * a.shape[1]].view(stop - start, a.shape[1]))
    else:
        rows = b[start:stop] @ a
    return rows.mul_(scale) if scale != 1 else rows
