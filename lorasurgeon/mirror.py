"""What OUT holds besides the computed tensors, so that it mirrors the base: each shard's metadata (with our record of
the operation), the rewritten index, the config, and every non-weight file (tokenizer, generation config, ...)
copied; weights in other file formats are left out, since they would contradict the merged ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorasurgeon.checkpoint import MODEL_CONFIG, PICKLE_SUFFIXES
from lorasurgeon.header import DTYPES
from lorasurgeon.layout import companion_files
from lorasurgeon.plan import Plan
from lorasurgeon.version import __version__
from lorasurgeon.writer import TMP_MARK, CheckpointWriter

OTHER_WEIGHTS = (".safetensors", ".gguf", ".h5", ".msgpack")


def output_metadata(metadata: dict[str, str], plan: Plan) -> dict[str, str]:
    """The base shard's metadata, with format=pt (transformers requires it) and our record of the operation."""
    record = {
        "operation": plan.operation,
        "base": plan.base.path.name,
        "adapters": [a.path.name for a in plan.adapters],
        "weights": list(plan.weights),
        "version": __version__,
    }
    return {**metadata, "format": metadata.get("format", "pt"), "lorasurgeon": json.dumps(record)}


def output_index(plan: Plan) -> dict[str, Any]:
    meta = dict(plan.base.index_metadata)
    meta["total_size"] = output_bytes(plan)
    weight_map = {s.tensor.name: s.shard for s in plan.steps}
    return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}


def copy_companions(root: Path, plan: Plan, writer: CheckpointWriter) -> tuple[list[str], list[str]]:
    """Copy every non-weight file of a checkpoint directory (config, tokenizer, ...) into OUT, by the rules of
    `layout.companion_files` (hidden files skipped; links followed only inside the checkpoint)."""
    written = {s.name for s in plan.base.shards} | {plan.base.index_name}
    if plan.config is not None:
        written.add(MODEL_CONFIG)
    copied, skipped = [], []
    for companion in companion_files(root):
        if companion.name in written or TMP_MARK in companion.name:
            continue
        # Stale weights in another format would shadow or contradict the merged ones when loaded.
        suffix = Path(companion.name).suffix
        if suffix in PICKLE_SUFFIXES or suffix in OTHER_WEIGHTS:
            skipped.append(companion.name)
            continue
        writer.copy_file(companion.source, companion.name)
        copied.append(companion.name)
    return copied, skipped


def output_bytes(plan: Plan) -> int:
    return sum(DTYPES[s.out_dtype][1] * s.tensor.numel for s in plan.steps)
