"""Exact lowerings: LoRA factors rewritten into the forms that serving runtimes read, with the same ΔW.

Pure torch, no I/O. Shapes follow PEFT: A is (r, in) (conv: (r, in, *k); embedding: (r, V)), B is (out, r)
(conv: (out, r, 1, ...); embedding: (d, r)); ΔW = s·B@A (embedding: s·(B@A)ᵀ). What cannot be lowered
exactly is refused by name (here for token rows; the per-runtime refusals are in runtimes.py).

- `pad_rank` + `padded_alpha`: zero rows of A and zero columns of B up to r′, with α′ = α·r′/r (α·√(r′/r) under
  rsLoRA) so that the scale is kept. B′A′ = BA exactly (the extra terms are products with zeros); the scale
  α′/r′ equals α/r up to one float64 rounding.
- `fold_scale`: B′ = round(B·c), c = s/ŝ, for a runtime that will apply the scale ŝ where PEFT applies s.
  llama.cpp applies ŝ = lora_alpha / rank-of-the-tensor to every module (one alpha, no alpha_pattern, no
  rsLoRA), so writing one lora_alpha α and B′ = B·(sᵢ·rᵢ/α) gives every module its ΔW: ŝᵢ·B′A = sᵢ·BA.
  Exact up to one rounding of B to its stored dtype (c is a float64; B·c is formed in fp64 and rounded once):
  |B′ − c·B| ≤ ½ ulp(c·B) elementwise, so each ΔW element is off by at most ~2⁻ᵖ·sᵢ·Σₖ|Bᵢₖ·Aₖⱼ| (p = 24
  for an fp32 B, 8 for bf16). c = 1 leaves B bit for bit; runtimes.common_alpha picks α so that most modules get c = 1.
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


def padded_alpha(alpha: float, rank: int, new_rank: int, rslora: bool) -> float:
    """The alpha that keeps a module's scale when its rank goes from `rank` to `new_rank`."""
    return alpha * math.sqrt(new_rank / rank) if rslora else alpha * new_rank / rank


def pad_rank(a: torch.Tensor, b: torch.Tensor, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A with zero rows and B with zero columns up to `new_rank` (same dtypes); B′A′ == BA exactly.

    Raises UnsupportedError when `new_rank` is below the current rank (that is `resize`, not a lowering).
    """
    rank = a.shape[0]
    if new_rank < rank or b.shape[1] != rank:
        raise UnsupportedError(f"cannot pad a rank-{rank} LoRA (B has {b.shape[1]} columns) to rank {new_rank}")
    if new_rank == rank:
        return a, b
    extra = new_rank - rank
    a_pad = torch.cat([a, a.new_zeros((extra, *a.shape[1:]))], dim=0)  # (r′, in, *k)
    b_pad = torch.cat([b, b.new_zeros((b.shape[0], extra, *b.shape[2:]))], dim=1)  # (out, r′, *1)
    return a_pad, b_pad


def fold_scale(b: torch.Tensor, scale: float, applied: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """B′ = round(B·(scale/applied)) to `dtype` (default B's own): with B′ the runtime's scale `applied` gives
    the ΔW that PEFT's `scale` gives with B. Returns B itself when the factor is 1 and the dtype unchanged.

    Raises UnsupportedError when `applied` is 0 or a factor is not finite.
    """
    if applied == 0.0 or not math.isfinite(scale / applied):
        raise UnsupportedError(f"cannot fold a scale of {scale} into B for a runtime applying {applied}")
    factor = scale / applied
    dtype = dtype or b.dtype
    if factor == 1.0 and dtype == b.dtype:
        return b
    return (b.double() * factor).to(dtype)  # one rounding, from fp64


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
