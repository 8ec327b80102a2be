"""Merges defined on each module's dense ΔWᵢ: TIES, DARE, DARE-TIES and magnitude pruning, one module at a time.

These act entry by entry, so unlike `factored` they need ΔWᵢ = sᵢ·Bᵢ·Aᵢ itself (in fp32, from
`linalg.lora_delta`), but only one module's: the caller streams modules and factorises each result with
`dense_to_factors` before the next. They are applied to ΔWᵢ, never to Aᵢ and Bᵢ separately (PEFT's `ties`,
`dare_*` and `magnitude_prune` do that, which adds cross terms; its `*_svd` variants are what is done here).

Definitions (Yadav et al. 2023, "TIES-Merging"; Yu et al. 2024, "DARE"), with PEFT's conventions
(peft/utils/merge_utils.py, 0.21.2) where the papers leave a choice:
- trim: keep the ⌊density·numel⌋ entries of largest |x|; ties at the threshold keep the lowest flat indices.
- elect: per entry, γ = sign(Σᵢ τᵢ) ("total", the TIES paper's mass) or sign(Σᵢ sign τᵢ) ("frequency"), over
  the *unweighted* trimmed τᵢ, with γ = +1 where that sum is 0 (PEFT).
- disjoint merge: Σ_{i: sign τᵢ = γ} wᵢ·τᵢ / #{i: sign τᵢ = γ} (zeros agree with no sign; 0 where none do).
  With all wᵢ = 1 this is the paper's. mergekit (merge_methods/generalized_task_arithmetic.py) differs when
  weights differ: it elects on the weighted wᵢ·τᵢ and divides by Σ wᵢ over the agreeing i, not by their count.
- DARE: keep each entry with probability `density` (drop p = 1 − density) and rescale kept ones by
  1/density, so E[result] = τ. The mask depends only on (seed, module name, adapter index) and the shape, so
  any process, device or order of modules draws identical bits (PEFT draws from the global RNG).
density ≥ 1 leaves a tensor as it is (as PEFT does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.factored import Factored, truncate

Method = Literal["ties", "dare", "dare_ties", "magnitude_prune"]
SignMethod = Literal["total", "frequency"]


def check_density(density: float) -> None:
    """Raise LorasurgeonError unless 0 < density ≤ 1 (0 would keep nothing and divide DARE by zero)."""
    if not 0 < density <= 1:
        raise LorasurgeonError(f"--density {density}: must be in (0, 1]")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its ⌊density·numel⌋ largest-magnitude entries set to 0 (ties: lowest indices kept)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    keep_count = int(density * flat.numel())
    if keep_count == 0:
        return torch.zeros_like(delta)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, flat.numel() - keep_count + 1).values  # the keep_count-th largest
    keep = magnitude > threshold
    at_threshold = magnitude == threshold
    keep |= at_threshold & (torch.cumsum(at_threshold, 0) <= keep_count - keep.sum())
    return torch.where(keep, flat, 0.0).reshape(delta.shape)


def dare_generator(seed: int, module: str, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, module name, adapter index) alone, through BLAKE2b."""
    digest = hashlib.blake2b(f"{seed}\0{module}\0{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def dare_mask(shape: torch.Size, density: float, seed: int, module: str, index: int) -> torch.Tensor:
    """The entries DARE keeps (bool, on CPU): uniform fp32 draws < density, from `dare_generator`."""
    return torch.rand(shape, generator=dare_generator(seed, module, index)) < density


def drop_and_rescale(delta: torch.Tensor, density: float, seed: int, module: str, index: int) -> torch.Tensor:
    """DARE on one ΔWᵢ: each entry kept with probability `density` and divided by it, else 0."""
    if density >= 1:
        return delta
    keep = dare_mask(delta.shape, density, seed, module, index).to(delta.device)
    return torch.where(keep, delta / density, 0.0)


def disjoint_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], sign_method: SignMethod) -> torch.Tensor:
    """TIES' elect + disjoint mean over (trimmed or dropped) τᵢ of one module, weighted after the election."""
    mass = torch.zeros_like(tensors[0])
    for tau in tensors:
        mass += tau if sign_method == "total" else tau.sign()
    elected = torch.where(mass >= 0, 1.0, -1.0)
    merged, count = torch.zeros_like(mass), torch.zeros_like(mass)
    for tau, weight in zip(tensors, weights, strict=True):
        agrees = tau.sign() == elected
        merged += torch.where(agrees, tau * weight, 0.0)
        count += agrees
    return merged / count.clamp(min=1)


def ties(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, sign_method: SignMethod = "total"
) -> torch.Tensor:
    """TIES-Merging of one module's ΔWᵢ: trim each to `density`, elect signs, disjoint weighted mean."""
    return disjoint_merge([trim(d, density) for d in deltas], weights, sign_method)


def magnitude_prune(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Σ wᵢ·trim(ΔWᵢ, density): each delta pruned to its largest entries, then summed with its weight."""
    return _weighted_sum([trim(d, density) for d in deltas], weights)


def dare(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, seed: int, module: str
) -> torch.Tensor:
    """DARE (PEFT's dare_linear): Σ wᵢ·drop_and_rescale(ΔWᵢ), adapter i's mask drawn from (seed, module, i)."""
    return _weighted_sum([drop_and_rescale(d, density, seed, module, i) for i, d in enumerate(deltas)], weights)


def dare_ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    seed: int,
    module: str,
    sign_method: SignMethod = "total",
) -> torch.Tensor:
    """DARE's drop and rescale in place of TIES' trim, then TIES' election and disjoint weighted mean."""
    dropped = [drop_and_rescale(d, density, seed, module, i) for i, d in enumerate(deltas)]
    return disjoint_merge(dropped, weights, sign_method)


def _weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for tau, weight in zip(tensors, weights, strict=True):
        out += tau * weight
    return out


MergeFunction = Callable[[Sequence[torch.Tensor], Sequence[float], float, int, str, SignMethod], torch.Tensor]

METHODS: dict[str, MergeFunction] = {
    "ties": lambda d, w, density, seed, module, sign: ties(d, w, density, sign),
    "dare": lambda d, w, density, seed, module, sign: dare(d, w, density, seed, module),
    "dare_ties": lambda d, w, density, seed, module, sign: dare_ties(d, w, density, seed, module, sign),
    "magnitude_prune": lambda d, w, density, seed, module, sign: magnitude_prune(d, w, density),
}


def merge_dense(
    method: Method,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    seed: int,
    module: str,
    sign_method: SignMethod = "total",
) -> torch.Tensor:
    """One module's merged dense ΔW by `method`; `module` names it for DARE's masks (and errors).

    Raises LorasurgeonError for a density outside (0, 1] or weights that do not match the deltas.
    """
    check_density(density)
    if len(deltas) != len(weights) or not deltas:
        raise LorasurgeonError(f"{module}: {len(weights)} weights for {len(deltas)} adapters")
    return METHODS[method](deltas, weights, density, seed, module, sign_method)


def dense_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U (m, k), σ (k,), Vᵀ (k, n)), k = min(m, n), of a 2-D delta in its own dtype (fp32 or fp64)."""
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    return u, sigma, vh


def dense_to_factors(delta: torch.Tensor, rank: int) -> Factored:
    """The best rank-`rank` factors of one dense ΔW (Eckart–Young), σ split evenly as `factored.truncate` does."""
    return truncate(*dense_svd(delta), rank)
