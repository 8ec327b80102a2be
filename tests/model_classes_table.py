"""Builds lorasurgeon/formats/model_classes.json from the installed transformers: for every model class of its auto
mappings, the model type, the PEFT task type its auto class gives it, and its tied weights (`_tied_weights_keys`,
transformers v5's {target: source} form), plus the model types whose config ties whatever tie_word_embeddings says.

    python tests/model_classes_table.py     # rewrite the table (after upgrading transformers)

tests/test_model_classes.py checks the shipped table against transformers with the same function.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

TABLE = Path(__file__).parent.parent / "lorasurgeon" / "formats" / "model_classes.json"
# transformers' own test of an "expanded" mapping (modeling_utils.get_expanded_tied_weights_keys): plain parameter
# names, no regex and no module names. Patterns (detection models' box heads) are left out: their names are unknown.
PLAIN = re.compile(r"^[A-Za-z0-9_.]+\.(weight|bias)$")
# The auto mappings whose PEFT task type loads with AutoPeftModelFor<Task> (the auto class loads the base). The task
# types that add implicit modules_to_save (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) are never written, so none is here.
TASKS = {
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "CAUSAL_LM",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "SEQ_2_SEQ_LM",
}


def build() -> dict[str, Any]:
    """The table for the installed transformers (imports every model class: about a minute)."""
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    classes: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for name in sorted(n for n in dir(modeling_auto) if n.startswith("MODEL_") and n.endswith("_MAPPING_NAMES")):
        for model_type, value in getattr(modeling_auto, name).items():
            for cls in value if isinstance(value, (list, tuple)) else (value,):
                classes.setdefault(cls, model_type)
                if name in TASKS and getattr(modeling_auto, name).get(model_type) == cls:
                    tasks.setdefault(cls, TASKS[name])
    ties: list[dict[str, str]] = []
    table: dict[str, list[Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls, model_type in sorted(classes.items()):
            found = getattr(transformers, cls, None)
            tied = getattr(found, "_tied_weights_keys", None) if found is not None else None
            if found is None or (tied is not None and not isinstance(tied, dict)):
                continue
            tied = dict(tied or {})
            if not all(PLAIN.match(k) for k in (*tied, *tied.values())):
                continue
            if tied and tied not in ties:
                ties.append(tied)
            table[cls] = [model_type, tasks.get(cls), ties.index(tied) if tied else None]
    return {
        "transformers": transformers.__version__,
        "classes": table,
        "tied": ties,
        "forced_tie": sorted(_forced_tie(configuration_auto.CONFIG_MAPPING_NAMES, transformers)),
    }


def _forced_tie(configs: dict[str, str], transformers: Any) -> list[str]:
    """Model types whose config sets tie_word_embeddings true whatever it is given (T5's since transformers v5)."""
    forced = []
    for model_type, name in configs.items():
        try:
            config = getattr(transformers, name)(tie_word_embeddings=False)
        except Exception:  # a config that cannot be built from defaults says nothing here
            continue
        if getattr(config, "tie_word_embeddings", False):
            forced.append(model_type)
    return forced


def write() -> None:
    """One class or tie per line, so that a transformers upgrade reads as a diff."""
    table = build()
    lines = [
        "{",
        f'"transformers": {json.dumps(table["transformers"])},',
        f'"forced_tie": {json.dumps(table["forced_tie"])},',
    ]
    lines += ['"tied": [', ",\n".join(json.dumps(t, sort_keys=True) for t in table["tied"]), "],", '"classes": {']
    lines += [",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in table["classes"].items()), "}", "}"]
    TABLE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write()
