"""What `report` says of an adapter of a PEFT tuner other than LoRA: what the tuner is and what it changes, whether
lorasurgeon merges, unmerges and converts it (and, where not, why), and the config fields that are its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorasurgeon.adapter import Adapter
from lorasurgeon.formats.peft_tuner_inventory import DESCRIPTIONS, REFUSED, refusal
from lorasurgeon.tuner_kinds import LORA_FORMS, is_additive, lora_form_refusal, unmerge_refusal

# adapter_config.json fields every PEFT config has and that say nothing of the tuner's maths.
BOILERPLATE = ("auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "task_type", "peft_version")
SETS_TENSORS = {  # the tuners whose files set base tensors outright, as Replacements or TokenRows
    "LN_TUNING": "the adapter holds the norms' new parameters, not the old ones",
    "TRAINABLE_TOKENS": "the adapter holds the embedding rows' new values, not the old ones",
}


@dataclass(frozen=True)
class TunerReport:
    """A non-LoRA PEFT tuner: its peft_type, name, what it is and what it changes; `merge`, `unmerge` and `convert`
    are "exact: how" or "refused: why"."""

    peft_type: str
    name: str
    what: str
    changes: str
    merge: str
    unmerge: str
    convert: str


def describe(adapter: Adapter) -> TunerReport | None:
    """The tuner of `adapter`, or None for a LoRA adapter."""
    peft_type = adapter.tuner
    if not peft_type:
        return None
    found = DESCRIPTIONS.get(peft_type)
    if found is None:
        why = f"refused: {refusal(peft_type) or 'not read'}"
        return TunerReport(peft_type, peft_type, REFUSED.get(peft_type, "a PEFT tuner"), "", why, why, why)
    module = adapter.tuner_modules[0] if adapter.tuner_modules else None
    if peft_type in SETS_TENSORS:
        unmerge = f"refused: {SETS_TENSORS[peft_type]}"
        convert = "exact to PEFT only: the tensors are copied with the config"
    elif module is None:
        unmerge = convert = "refused: the adapter holds no module to merge"
    else:
        sign = "W′ − ΔW" if is_additive(module) else "the inverse product (refused where a scale is zero)"
        cannot, lora = unmerge_refusal(module), lora_form_refusal(module)
        unmerge = f"refused: {cannot}" if cannot else f"exact: {sign}"
        convert = f"refused: {lora}" if lora else f"exact, as a LoRA of fp32 factors: {LORA_FORMS[peft_type][1]}"
    return TunerReport(peft_type, found.name, found.what, found.changes, f"exact: {found.changes}", unmerge, convert)


def tuner_config(adapter: Adapter) -> dict[str, Any]:
    """The config fields that are the tuner's parameters (all but PEFT's boilerplate), as written."""
    return {k: v for k, v in adapter.config.items() if k not in BOILERPLATE}
