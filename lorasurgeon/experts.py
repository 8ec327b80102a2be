"""Pure maths of PEFT's LoRA on fused MoE expert parameters (`target_parameters`, peft/tuners/lora/layer.py
ParamWrapper): torch only, no I/O.

A fused parameter holds E experts. `lora_A` (r·E, in) is read as (E, r, in): expert e owns rows e·r … (e+1)·r;
`lora_B` (out, r·E) as (out, r, E): expert e owns columns e, e+E, e+2E, …; ΔW_e = s · B_e A_e with s from r
(not r·E). "in"/"out" are PEFT's: a parameter of an experts class without `is_transposed` is (E, out, in), one
with it (gpt-oss) is (E, in, out). formats/moe.py says where each expert's rows live on disk.
"""

from __future__ import annotations

import torch


def expert_factors(
    a: torch.Tensor, b: torch.Tensor, num_experts: int, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s (B_e (out, r), A_e (r, in)) from PEFT's `lora_B` (out, r·E) and `lora_A` (r·E, in)."""
    rank = a.shape[0] // num_experts
    return b[:, expert::num_experts], a[expert * rank : (expert + 1) * rank]


def expert_delta(a: torch.Tensor, b: torch.Tensor, scale: float, num_experts: int, expert: int) -> torch.Tensor:
    """s · B_e A_e for one expert, (out, in), in fp32 (fp64 inputs stay fp64)."""
    b_e, a_e = expert_factors(a, b, num_experts, expert)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return (b_e.to(dtype) @ a_e.to(dtype)) * scale  # (out, r) @ (r, in) -> (out, in)


def expert_deltas(a: torch.Tensor, b: torch.Tensor, scale: float, num_experts: int, transposed: bool) -> torch.Tensor:
    """PEFT's ParamWrapper delta for a fused parameter, in its layout: (E, out, in), or (E, in, out) when
    `transposed` (the experts class' `is_transposed`)."""
    deltas = torch.stack([expert_delta(a, b, scale, num_experts, e) for e in range(num_experts)])  # (E, out, in)
    return deltas.transpose(1, 2) if transposed else deltas


def slice_delta(
    a: torch.Tensor, b: torch.Tensor, scale: float, num_experts: int, expert: int, rows: slice
) -> torch.Tensor:
    """Rows `rows` of expert `expert`'s ΔW (out, in): the gate or the up half of a gate_up_proj, say. Rows of ΔW_e
    are rows of B_e, so slicing B first makes a half cost half the product."""
    return expert_delta(a, b[rows], scale, num_experts, expert)


def silent_experts(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> tuple[int, ...]:
    """The experts whose delta B_e A_e is exactly zero (e.g. their columns of B are all zero): a merge that
    claims to adapt them would leave them unchanged, so it must say so instead."""
    products = (expert_delta(a.double(), b.double(), 1.0, num_experts, e) for e in range(num_experts))
    return tuple(e for e, product in enumerate(products) if not product.any())
