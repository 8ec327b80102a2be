"""transformers model classes, as config.json `architectures` names them: each class's model type, the PEFT task
type its auto class loads it with, and the weights it ties (`_tied_weights_keys`, transformers v5's {target: source}
form), from model_classes.json, a table generated from transformers itself (tests/model_classes_table.py writes it;
tests/test_model_classes.py checks it against the installed transformers).

A class the table does not hold is unknown: its tied weights cannot be known, and callers refuse what needs them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

TABLE = "model_classes.json"


@dataclass(frozen=True)
class ModelClass:
    """One transformers model class. `tied` maps each tied weight to the one it is tied to (target -> source, as
    transformers names them in the class); `forced_tie`: its config ties them whatever tie_word_embeddings says
    (T5's since transformers v5, which then unties only tensors stored apart with different values)."""

    name: str
    model_type: str
    task_type: str | None
    tied: Mapping[str, str]
    forced_tie: bool


@functools.cache
def _table() -> dict[str, Any]:
    text = resources.files("lorasurgeon.formats").joinpath(TABLE).read_text(encoding="utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def transformers_version() -> str:
    """The transformers version the table was generated from."""
    return str(_table()["transformers"])


def model_class(config: Mapping[str, Any] | None) -> ModelClass | None:
    """The class config.json's first `architectures` entry names, or None when it names none the table knows."""
    architectures = (config or {}).get("architectures") or []
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    entry = _table()["classes"].get(name) if isinstance(name, str) else None
    if entry is None or not isinstance(name, str):
        return None
    model_type, task, tied = entry
    ties = _table()["tied"][tied] if tied is not None else {}
    forced = str((config or {}).get("model_type", model_type)) in _table()["forced_tie"]
    return ModelClass(name, model_type, task, dict(ties), forced)


def task_type(config: Mapping[str, Any]) -> str | None:
    """PEFT's task_type for a model config.json: the one whose AutoPeftModelFor<Task> loads the class (CAUSAL_LM,
    SEQ_2_SEQ_LM), else None (task types that add implicit modules_to_save heads are never chosen)."""
    found = model_class(config)
    if found is not None:
        return found.task_type
    architectures = config.get("architectures") or []  # a class of its own code (trust_remote_code)
    causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "CAUSAL_LM" if causal else None


def auto_mapping(config: Mapping[str, Any]) -> dict[str, str] | None:
    """PEFT's auto_mapping for an adapter without a task type: the base's class and library, so that AutoPeftModel
    can build the base (transformers classes from `architectures`, diffusers models from `_class_name`)."""
    architectures = config.get("architectures") or []
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return {"base_model_class": architectures[0], "parent_library": "transformers"}
    name = config.get("_class_name")
    if isinstance(name, str) and "_diffusers_version" in config:
        return {"base_model_class": name, "parent_library": "diffusers"}
    return None
