"""What OUT holds besides the computed tensors, so that it mirrors the base: each shard's metadata (with our record of
the operation), the rewritten index, the config, and every non-weight file (tokenizer, generation config, ...)
copied; weights in other file formats are left out, since they would contradict the merged ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from lorasurgeon.checkpoint import MODEL_CONFIG, PICKLE_SUFFIXES
from lorasurgeon.header import DTYPES
from lorasurgeon.plan import Plan
from lorasurgeon.writer import TMP_MARK, CheckpointWriter

OTHER_WEIGHTS = (".safetensors", ".gguf", ".h5", ".msgpack")


def output_metadata(metadata: dict[str, str], plan: Plan) -> dict[str, str]:
    """The base shard's metadata, with format=pt (transformers requires it) and our record of the operation."""
    record = {
        "operation": plan.operation,
        "base": plan.base.path.name,
        "adapters": [a.path.name for a in plan.adapters],
        "weights": list(plan.weights),
        "version": _version(),
    }
    return {**metadata, "format": metadata.get("format", "pt"), "lorasurgeon": json.dumps(record)}


def output_index(plan: Plan) -> dict[str, Any]:
    meta = dict(plan.base.index_metadata)
    meta["total_size"] = output_bytes(plan)
    weight_map = {s.tensor.name: s.shard for s in plan.steps}
    return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}


def copy_companions(root: Path, plan: Plan, writer: CheckpointWriter) -> tuple[list[str], list[str]]:
    """Copy every non-weight file of a checkpoint directory (config, tokenizer, ...) into OUT."""
    written = {s.name for s in plan.base.shards} | {plan.base.index_name}
    if plan.config is not None:
        written.add(MODEL_CONFIG)
    copied, skipped = [], []
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        if rel in written:
            continue
        # Stale weights in another format would shadow or contradict the merged ones when loaded.
        if path.suffix in PICKLE_SUFFIXES or path.suffix in OTHER_WEIGHTS:
            skipped.append(rel)
            continue
        writer.copy_file(path, rel)
        copied.append(rel)
    return copied, skipped


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        inner = path.parts[len(root.parts) :]
        if path.is_file() and not any(TMP_MARK in part or part.startswith(".") for part in inner):
            yield path


def output_bytes(plan: Plan) -> int:
    return sum(DTYPES[s.out_dtype][1] * s.tensor.numel for s in plan.steps)


def _version() -> str:
    try:
        return package_metadata.version("lorasurgeon")
    except package_metadata.PackageNotFoundError:
        return "unknown"
