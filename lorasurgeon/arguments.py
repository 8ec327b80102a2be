"""The API's arguments checked before any work is done (and before torch is imported, which takes seconds):
devices, output dtypes, one weight per adapter, and OUT's path for merge and unmerge. A bad value is a
LorasurgeonError naming the parameter as the caller wrote it (errors.Option)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, Option
from lorasurgeon.hub import display_name

if TYPE_CHECKING:
    from lorasurgeon.plan import Operation

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def adapter_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One weight per adapter (all 1 when none are given)."""
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise LorasurgeonError(
            Option("weights", cli="weight"),
            f" was given {len(weights)} weights for {count} adapters; give one per adapter",
        )
    return [float(w) for w in weights]


def output_dtype(dtype: str) -> str | None:
    """The safetensors dtype name `dtype` (keep, fp32, fp16, bf16) stands for; None keeps each tensor's."""
    if dtype not in DTYPE_CHOICES:
        raise LorasurgeonError(Option("dtype", dtype), f": expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[dtype]


def output_path(ckpt: Checkpoint, out: str | Path | None, operation: Operation) -> Path:
    """OUT, which mirrors the base's layout: a directory for a directory or index, one file for one file."""
    if out is None:
        return default_output(ckpt, operation)
    if ckpt.layout != "file" and Path(out).suffix == ".safetensors":
        raise LorasurgeonError(
            f"{out}: names one .safetensors file, but the base {ckpt.path} is a checkpoint directory or index, which "
            "OUT mirrors as a directory; name OUT as a directory, or give the base's .safetensors file to write one"
        )
    return Path(out)


def default_output(ckpt: Checkpoint, operation: Operation) -> Path:
    """`<base name>-merged[.safetensors]` in the current directory, mirroring the base's layout."""
    suffix = f"-{operation}d"
    if ckpt.layout == "file":
        return Path(f"{ckpt.path.stem}{suffix}.safetensors")
    return Path(f"{display_name(ckpt.root)}{suffix}")
