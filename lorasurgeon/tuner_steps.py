"""The tuner terms of a plan step, computed for the surgery: the ΔW of additive tuners (summed with the LoRA
terms' before the one add), and the one product a step may hold (IA3, OFT, ...), applied to the step's fp32 value.

Tensors are read from the adapter's source one module at a time (with the adapter's shared ones) and are in fp32
on the step's device; the surgery rounds the result once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lorasurgeon import tuner_merge
from lorasurgeon.plan import Plan, Step
from lorasurgeon.tuner_placement import TunerTerm


def has_sum(step: Step) -> bool:
    """Whether the step adds a ΔW of an additive tuner."""
    return any(t.additive for t in step.tuners)


def deltas(plan: Plan, step: Step, device: torch.device) -> Iterator[torch.Tensor]:
    """factor · ΔW of each additive tuner term of the step, laid out like the step's tensor, one at a time."""
    for term in step.tuners:
        if term.additive:
            delta = tuner_merge.delta(term.module, step.tensor.shape, _factors(plan, term, device), layer=term.layer)
            yield delta.mul_(term.factor) if term.factor != 1.0 else delta


def apply_products(plan: Plan, step: Step, exact: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`exact` (the step's fp32 start) changed by the step's product term, merged or unmerged; as it is without
    one. The plan lets no other term share a product's tensor."""
    term = next((t for t in step.tuners if not t.additive), None)
    if term is None:
        return exact
    base = {term.param: exact}
    if term.weight is not None:  # a bias: the maths reads the module's weight as well
        base["weight"] = plan.base.read(term.weight).to(device).float()
    step_of = tuner_merge.merge if plan.operation == "merge" else tuner_merge.unmerge
    return step_of(term.module, base, _factors(plan, term, device), layer=term.layer)[term.param]


def _factors(plan: Plan, term: TunerTerm, device: torch.device) -> dict[str, torch.Tensor]:
    adapter = plan.adapters[term.adapter]
    roles = {**adapter.shared, **term.module.factors}
    return {role: adapter.source.read(info).to(device) for role, info in roles.items()}
