"""Where an "experts" module (LoRA on a fused MoE parameter) lands in a base checkpoint, from headers alone, and
the self-test that every targeted expert got its delta.

The adapter speaks the in-memory fused parameter (`model.layers.0.mlp.experts.gate_up_proj`, (E, 2I, H)); the
checkpoint stores it fused the same way, or per expert under the names transformers' conversion tables give
(Mixtral `block_sparse_moe.experts.3.w1.weight` and `.w3.weight`: rows 0:I and I:2I of ΔW_3). formats/moe.py
holds the layouts; this module checks the fit and counts, per experts module, the experts each placement covers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.errors import Finding
from lorasurgeon.fit import factor_findings, nonfinite_findings
from lorasurgeon.formats import moe
from lorasurgeon.formats.resolution import BaseNames
from lorasurgeon.header import TensorInfo


@dataclass(frozen=True)
class ExpertPlacement:
    """One base tensor an experts module changes: `piece` says which expert's rows (or, with expert None, the
    whole fused delta) it takes; `transpose` when the fused tensor is (E, in, out) (gpt-oss)."""

    tensor: TensorInfo
    piece: moe.ExpertSlice
    transpose: bool


@dataclass(frozen=True)
class ExpertCount:
    """The self-test of one experts module: `targeted` experts (lora_A's rows / r), `placed` those that some base
    tensor takes a delta for, on `tensors` tensors stored `layout` ("fused" or "per-expert"); `key` names its
    lora_A in messages."""

    key: str
    module: str
    parameter: str
    layout: str
    targeted: int
    placed: int
    tensors: int

    @property
    def complete(self) -> bool:
        return self.placed == self.targeted


def place_experts(
    names: BaseNames, adapter: Adapter, module: LoraModule, allow_nonfinite: bool
) -> tuple[list[ExpertPlacement], list[Finding]]:
    """The base tensors `module` changes, or the findings that say why it cannot be placed: an unknown expert
    layout, another number of experts than config.json, a tensor of another shape, no tensor at all, factors of
    the wrong dtype or rank; NaN/Inf in its factors (warnings with `allow_nonfinite`, then it is placed)."""
    placements, problems = _placements(names, module)
    if not placements:
        return [], problems
    first = placements[0].tensor
    problems = factor_findings(module, first, adapter.rank_source)
    problems = problems or nonfinite_findings(adapter, module, first, allow_nonfinite)
    return ([], problems) if any(p.severity == "error" for p in problems) else (placements, problems)


def _placements(names: BaseNames, module: LoraModule) -> tuple[list[ExpertPlacement], list[Finding]]:
    config = names.config
    key = module.a.name
    layout = moe.layout_of(config)
    fused = f"{module.module}.{module.parameter}"
    if layout is None or module.parameter not in layout.params:
        problem = (
            f"it adapts the fused experts parameter {fused}, and no expert layout is known for model_type "
            f"{config.get('model_type')!r} (lorasurgeon knows {', '.join(sorted(moe.LAYOUTS))})"
        )
        return [], [Finding.against(key, None, problem)]
    configured = moe.num_experts(config)
    if configured is not None and configured != module.experts:
        problem = f"lora_A holds {module.experts} experts of rank {module.rank}, but config.json says {configured}"
        return [], [Finding.against(key, None, problem)]
    shape = moe.fused_shape(layout, module.experts, module.b.shape[0], module.a.shape[1])
    found = moe.expert_slices(config, fused, shape, names.tensors)
    if found.problem is not None:
        return [], [Finding.against(key, None, found.problem)]
    placements, problems = [], []
    for piece in found.slices:
        info = names.tensors[piece.tensor]
        if info.shape != piece.shape:
            which = "the fused delta" if piece.expert is None else f"expert {piece.expert}'s rows"
            problem = f"{which} of {fused} are {list(piece.shape)}, but the base tensor is {list(info.shape)}"
            problems.append(Finding.against(key, info.name, problem))
        elif not info.is_float:
            problems.append(Finding.against(key, info.name, f"base tensor has dtype {info.dtype}, not floating point"))
        else:
            placements.append(ExpertPlacement(info, piece, layout.transposed and piece.expert is None))
    return ([], problems) if problems else (placements, [])


def count_experts(placed: Iterable[tuple[LoraModule, moe.ExpertSlice]]) -> tuple[ExpertCount, ...]:
    """Per experts module (in order), how many of its experts the plan's terms cover and on how many tensors."""
    seen: dict[tuple[str, str], tuple[LoraModule, set[int], set[str]]] = {}
    for module, piece in placed:
        entry = seen.setdefault((module.module, module.parameter), (module, set(), set()))
        entry[1].update(range(module.experts) if piece.expert is None else (piece.expert,))
        entry[2].add(piece.tensor)
    return tuple(
        ExpertCount(m.a.name, m.module, m.parameter, "per-expert" if len(t) > 1 else "fused", m.experts, len(e), len(t))
        for m, e, t in seen.values()
    )


def self_test(
    placed: Iterable[tuple[LoraModule, moe.ExpertSlice]],
    targets: Iterable[str],
    changed: Iterable[str],
    tensors: Iterable[str],
) -> tuple[tuple[ExpertCount, ...], list[Finding]]:
    """The counts of every experts module's placed experts, an error for each that misses some, and DeepSeek's
    moved targets (`targets`: the adapters' target_parameters; `changed`: the tensors some term changes;
    `tensors`: the base's names)."""
    counts = count_experts(placed)
    moved = moved_targets(sorted(set(targets)), changed, tensors) if counts else []
    return counts, incomplete(counts) + moved


def incomplete(counts: Iterable[ExpertCount]) -> list[Finding]:
    """The self-test: an error for every experts module that would leave some targeted expert unchanged."""
    return [
        Finding.against(
            c.key,
            None,
            f"only {c.placed} of its {c.targeted} experts have a base tensor; the merge would leave the others "
            "unchanged, and lorasurgeon never falls back to the base weight silently",
        )
        for c in counts
        if not c.complete
    ]


def delta_params(module: LoraModule) -> int:
    """LoRA parameters per expert of an experts module: r · (in + out)."""
    return module.rank * (module.a.shape[1] + module.b.shape[0]) if module.experts else math.prod(module.a.shape)


def moved_targets(targets: Iterable[str], changed: Iterable[str], tensors: Iterable[str]) -> list[Finding]:
    """A warning per bare target_parameters entry (`down_proj`) that also names Linear modules of the base which
    the adapter leaves unchanged: PEFT >= 0.18 rewrites target_modules "down_proj" on an MoE model into
    target_parameters "down_proj", which adapts only the routed experts, so the dense layers' and shared
    experts' down_proj keep their weights in PEFT's forward too. lorasurgeon follows that forward and says so."""
    changed = set(changed)
    findings = []
    for target in (t for t in targets if "." not in t):
        missed = sorted(n for n in tensors if n.endswith(f".{target}.weight") and n not in changed)
        if missed:
            shown = ", ".join(missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
            problem = (
                f"target_parameters {target!r} (what PEFT makes of target_modules {target!r} on MoE models) adapts "
                f"only the routed experts; the base's other {target} weights ({shown}) are unchanged, as in PEFT's "
                "forward of this adapter"
            )
            findings.append(Finding.of("warning", problem))
    return findings
