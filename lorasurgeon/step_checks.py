"""A computed step's result checked before it is written: NaN/Inf carried from the inputs or made by the sum, and
overflow of the output dtype, refused (or, with allow_nonfinite, warned by tensor name); an unmerge's restored weight
against the adapter's saved copy of the base weight. For surgery.compute, on the slow path only.
"""

from __future__ import annotations

import warnings

import torch

from lorasurgeon import linalg
from lorasurgeon.errors import MismatchError, NonfiniteWarning, NumericError, Option, Part
from lorasurgeon.header import torch_dtype
from lorasurgeon.plan import Plan, Step


def check_restored(plan: Plan, step: Step, restored: torch.Tensor, delta: torch.Tensor) -> None:
    """Unmerge: merged − ΔW must be the adapter's saved copy of the base weight, up to the rounding of a merge and
    an unmerge; anything more means MERGED was not made from this adapter."""
    if step.expected is None:
        return
    saved = plan.adapters[step.expected.adapter].source.read(step.expected.tensor).to(restored.device)
    excess = linalg.rounding_excess(restored, saved, delta, (torch_dtype(step.tensor.dtype), saved.dtype))
    if excess > 0:
        raise MismatchError(
            f"{step.tensor.path.name}: {step.tensor.name} minus the adapter's ΔW differs from "
            f"{step.expected.tensor.name}, the adapter's saved copy of the base weight, by {excess:.3g} more than "
            "rounding allows, so MERGED was not made by merging this adapter into that base"
        )


def check_finite(plan: Plan, step: Step, weight: torch.Tensor, exact: torch.Tensor, result: torch.Tensor) -> None:
    """The slow path, taken only when linalg.fits found a problem: refuse NaN/Inf carried from the base or
    its replacement (`weight`, read again) or produced by the sum (`plan.allow_nonfinite`: warn, by name, through
    NonfiniteWarning); overflow of the output dtype is always an error."""
    name = f"{step.tensor.path.name}: {step.tensor.name}"
    overflow = linalg.overflow_count(exact, result)
    if overflow:
        raise NumericError(
            f"{name}: {overflow} values overflow {step.out_dtype} after adding the adapter "
            f"(largest magnitude {exact.abs().max().item():.4g})"
        )
    bad_in, bad_out = linalg.nonfinite_count(weight), linalg.nonfinite_count(result)
    if bad_in:
        origin = (
            "the base tensor" if step.replacement is None else f"{step.replacement.tensor.name}, which replaces it,"
        )
        origin += " (with its trainable-token rows)" if step.rows else ""
        problem = f"{origin} holds {bad_in} NaN/Inf values, which the {step.out_dtype} result would carry"
    elif bad_out:
        problem = f"the result holds {bad_out} NaN/Inf values"
    else:
        return
    allow: Part = Option("allow_nonfinite", flag=True)
    if not plan.allow_nonfinite:
        raise NumericError(f"{name}: {problem}; fix the input or pass ", allow)
    warnings.warn(NonfiniteWarning(f"{name}: {problem}; written anyway (", allow, ")"), stacklevel=2)
