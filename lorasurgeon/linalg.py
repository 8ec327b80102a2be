"""Pure tensor maths for LoRA surgery: no I/O, no device policy, no error types beyond what torch raises.

Shapes follow PEFT: A is (r, in), B is (out, r), and a delta is laid out like the weight it changes.
"""

from __future__ import annotations

import torch


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """ΔW = scale · (B @ A), transposed first for weights stored (in, out) (transformers Conv1D), in fp32.

    The product is formed before scaling, as PEFT's get_delta_weight does, so results agree to rounding.
    """
    delta = b.float() @ a.float()  # (out, r) @ (r, in) -> (out, in)
    if transpose:
        delta = delta.T
    return delta * scale


def add_delta(weight: torch.Tensor, delta: torch.Tensor, sign: int) -> torch.Tensor:
    """fp32(W) + sign · ΔW in fp32; the caller rounds it once to the stored dtype."""
    return weight.float() + sign * delta


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many elements are NaN or ±Inf (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum().item())


def overflow_count(exact: torch.Tensor, rounded: torch.Tensor) -> int:
    """How many finite values of `exact` became ±Inf when rounded (e.g. past fp16's 65504)."""
    return int((torch.isfinite(exact) & ~torch.isfinite(rounded)).sum().item())
