"""Exact lowerings: LoRA factors rewritten into the forms that serving runtimes read, with the same ΔW.

Pure torch, no I/O. Shapes follow PEFT: A is (r, in) (conv: (r, in, *k); embedding: (r, V)), B is (out, r)
(conv: (out, r, 1, ...); embedding: (d, r)); ΔW = s·B@A (embedding: s·(B@A)ᵀ). What cannot be lowered
exactly is refused by name (here for token rows; the per-runtime refusals are in runtimes.py).

- `pad_rank`: zero rows of A and zero columns of B up to r′. B′A′ = BA exactly (the extra terms are products
  with zeros); the caller states the scale for r′ (formats.scale_form with `rank`).
- `fold`: B′ = round(B·c), for a reader that applies ŝ where PEFT applies s (c = s/ŝ). llama.cpp applies
  ŝ = lora_alpha / rank-of-the-tensor to every module (one alpha, no alpha_pattern, no rsLoRA), so writing one
  lora_alpha α and B′ = B·(sᵢ·rᵢ/α) gives every module its ΔW: ŝᵢ·B′A = sᵢ·BA. Exact up to one rounding of B
  to its stored dtype (c is a float64; B·c is formed in fp64 and rounded once): |B′ − c·B| ≤ ½ ulp(c·B)
  elementwise, so each ΔW element is off by at most ~2⁻ᵖ·sᵢ·Σₖ|Bᵢₖ·Aₖⱼ| (p = 24 for an fp32 B, 8 for bf16).
  c = 1 leaves B bit for bit; formats.scale_form picks α so that most modules get c = 1.
- `lowered`: one factor as `convert` writes it, padded and folded (formats.writing.Lowered says how).
- `token_rows_to_lora`: PEFT trainable tokens (new full rows of the embedding, not deltas) as an embedding
  LoRA of rank k (one-hot A, B = the row differences) or, for an untied lm_head, a Linear LoRA. It needs the
  base rows E[indices] from BASE: ΔE rows = new − old.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from lorasurgeon.errors import UnsupportedError


def pad_rank(factor: torch.Tensor, new_rank: int, dim: int) -> torch.Tensor:
    """`factor` with zeros appended along its rank axis `dim` (0 for A (r, in, *k), 1 for B (out, r, *1)) up to
    `new_rank`, in its own dtype; padding both factors leaves B′A′ == BA exactly.

    Raises UnsupportedError when `new_rank` is below the rank (that is `resize`, not a lowering).
    """
    rank = factor.shape[dim]
    if new_rank < rank:
        raise UnsupportedError(f"cannot pad a rank-{rank} LoRA factor to rank {new_rank}")
    if new_rank == rank:
        return factor
    shape = list(factor.shape)
    shape[dim] = new_rank - rank
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)  # (r′, in, *k) or (out, r′, *1)


def fold(b: torch.Tensor, factor: float) -> torch.Tensor:
    """B′ = round(B·factor) to B's dtype, formed in fp64 and rounded once; B itself when the factor is 1.

    Raises UnsupportedError when the factor is not finite.
    """
    if not math.isfinite(factor):
        raise UnsupportedError(f"cannot fold a factor of {factor} into B")
    if factor == 1.0:
        return b
    return (b.double() * factor).to(b.dtype)


def lowered(tensor: torch.Tensor, role: Literal["a", "b", "bias"], rank: int, factor: float) -> torch.Tensor:
    """One factor as convert writes it: A padded to `rank` rows; B padded to `rank` columns and folded by
    `factor`; a lora_B bias folded by `factor`."""
    if role == "a":
        return pad_rank(tensor, rank, 0)
    return fold(pad_rank(tensor, rank, 1) if role == "b" else tensor, factor)


def token_rows_to_lora(
    new_rows: torch.Tensor,
    base_rows: torch.Tensor,
    indices: Sequence[int],
    vocab: int,
    layout: Literal["embedding", "linear"] = "embedding",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, alpha) of a rank-k LoRA whose ΔW rows `indices` are new_rows − base_rows and all other rows 0,
    with scale alpha/k = 1; A and B are fp32.

    `new_rows` are PEFT's `trainable_tokens_delta` (k, d) — the trained rows themselves — and `base_rows` the
    same rows of the base weight (k, d), read from BASE. "embedding": A (k, V) one-hot, B (d, k) = Dᵀ, for
    an nn.Embedding (ΔW = (B@A)ᵀ). "linear": A (k, d) = D, B (V, k) one-hot, for an untied lm_head
    (ΔW = B@A). A model whose lm_head is tied to the embedding needs both: PEFT keeps a tied lm_head on the
    same trained rows, while an embedding LoRA changes only the input lookup.
    Exact, and checked: D is held in fp32, and fp32(E) + D (what PEFT's forward and lorasurgeon's merge
    compute) must give new_rows bit for bit; for bf16/fp16 rows D is exact, for fp32 rows the one rounding of
    D almost always still lands on the new value.
    Raises UnsupportedError for repeated or out-of-range indices, shapes that disagree, or rows where
    fp32(E) + D misses the new value (fp32 rows whose new and old values are many binades apart).
    """
    index = list(indices)
    if len(set(index)) != len(index) or any(not 0 <= i < vocab for i in index):
        raise UnsupportedError(f"trainable-token indices must be distinct rows of the {vocab}-row embedding")
    if new_rows.shape != base_rows.shape or new_rows.shape[0] != len(index):
        raise UnsupportedError(
            f"{len(index)} trainable-token indices but new rows {tuple(new_rows.shape)} and base rows "
            f"{tuple(base_rows.shape)}"
        )
    held = (new_rows.double() - base_rows.double()).float()  # (k, d): D, exact in fp64, rounded once to fp32
    if not torch.equal(base_rows.float() + held, new_rows.float()):  # what the merge and the forward compute
        raise UnsupportedError("the trainable-token rows differ from the base rows by more than fp32 holds exactly")
    k = len(index)
    one_hot = torch.zeros(k, vocab)
    one_hot[torch.arange(k), torch.tensor(index, dtype=torch.long)] = 1.0  # row j picks token indices[j]
    if layout == "embedding":
        return one_hot, held.T.contiguous(), float(k)  # A (k, V), B (d, k)
    return held, one_hot.T.contiguous(), float(k)  # A (k, d), B (V, k)
