"""The model's config.json as OUT states it: the base's, with every field that describes what the surgery changed
set to what OUT holds (tie_word_embeddings is lorasurgeon.ties'; this module states the dtype).

transformers loads a checkpoint in the dtype its config names (`dtype` since v5, `torch_dtype` before, also in the
sub-configs of composite models), so a merge with --dtype that left them would load bf16 weights as float32, at
twice the memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# safetensors dtype names (lorasurgeon.header) -> the names config.json gives torch dtypes.
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
DTYPE_FIELDS = ("dtype", "torch_dtype")


def with_dtype(config: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """`config` with each dtype field it has (at the top and in nested sub-configs) set to `dtype`, a safetensors
    dtype name; a config that names no dtype is returned as it is (transformers then reads the weights' own)."""
    name = TORCH_NAMES[dtype]
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in DTYPE_FIELDS and isinstance(value, str | None):
            out[key] = name if value is not None else None
        elif isinstance(value, Mapping):
            out[key] = with_dtype(value, dtype)
        else:
            out[key] = value
    return out


def output_config(
    base: Mapping[str, Any] | None, changed: dict[str, Any] | None, dtype: str | None
) -> dict[str, Any] | None:
    """OUT's config.json: `changed` (the base's with its ties undone) or the base's, with `dtype` stated; None when
    it is the base's as it is."""
    config = changed if changed is not None else base
    if config is None or dtype is None:
        return changed
    stated = with_dtype(config, dtype)
    return stated if stated != base else changed
