"""lorasurgeon: LoRA surgery on safetensors checkpoint files.

The public API is plain functions over paths; each returns a summary dataclass and never prints:

    >>> from lorasurgeon import merge
    >>> summary = merge("base/", ["adapter/"], "merged/")          # doctest: +SKIP
    >>> summary.changed                                             # doctest: +SKIP
    14
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from lorasurgeon.adapter import Adapter, load_adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, MismatchError
from lorasurgeon.plan import Plan, plan_surgery
from lorasurgeon.surgery import Progress, SurgerySummary, execute
from lorasurgeon.writer import CheckpointWriter

__all__ = ["LorasurgeonError", "Progress", "SurgerySummary", "check", "merge", "unmerge"]

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
PathLike = str | Path


def check(base: PathLike, adapters: Sequence[PathLike], *, alpha: float | None = None) -> Plan:
    """Check that the adapters fit the base checkpoint; returns the Plan, whose `findings` say what is wrong.

    Raises LorasurgeonError only for input that cannot be read at all.
    """
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        return plan_surgery("merge", ckpt, loaded, [1.0] * len(loaded))


def merge(
    base: PathLike,
    adapters: Sequence[PathLike],
    out: PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    alpha: float | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> SurgerySummary:
    """Write base + Σ weight_i · scale · ΔW_i to `out` (default: `<base>-merged` in the current directory).

    Each tensor gets the sum of its deltas in fp32, rounded once to its dtype (or `dtype`: keep, fp32,
    fp16, bf16). Raises MismatchError when the adapters do not fit, OutputError when `out` cannot be
    written, NumericError when a result would not be finite.
    """
    return _surgery("merge", base, adapters, out, weights, scale, alpha, device, dtype, force, dry_run, on_progress)


def unmerge(
    merged: PathLike,
    adapter: PathLike,
    out: PathLike | None = None,
    *,
    scale: float = 1.0,
    alpha: float | None = None,
    device: str = "auto",
    dtype: str = "keep",
    force: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> SurgerySummary:
    """Write merged − scale · ΔW to `out` (default: `<merged>-unmerged`). Exact only up to rounding:
    in bf16 a merge followed by an unmerge leaves about one ulp of difference on some elements."""
    return _surgery("unmerge", merged, [adapter], out, None, scale, alpha, device, dtype, force, dry_run, on_progress)


def _surgery(
    operation: str,
    base: PathLike,
    adapters: Sequence[PathLike],
    out: PathLike | None,
    weights: Sequence[float] | None,
    scale: float,
    alpha: float | None,
    device: str,
    dtype: str,
    force: bool,
    dry_run: bool,
    on_progress: Callable[[Progress], None] | None,
) -> SurgerySummary:
    started = time.perf_counter()
    weights = _weights(weights, len(adapters))
    torch_device = resolve_device(device)
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        plan = plan_surgery(operation, ckpt, loaded, weights, scale, _dtype(dtype))
        if plan.errors:
            more = (
                f" (and {len(plan.errors) - 1} more problems; run `lorasurgeon check`)" if len(plan.errors) > 1 else ""
            )
            raise MismatchError(plan.errors[0].message + more)
        target = Path(out) if out is not None else default_output(ckpt, operation)
        copied: list[str] = []
        skipped: list[str] = []
        written = 0
        stale: list[Path] = []
        if not dry_run:
            inputs = [Path(base), *(Path(a) for a in adapters)]
            with CheckpointWriter(target, is_dir=ckpt.layout != "file", inputs=inputs, force=force) as writer:
                copied, skipped = execute(plan, writer, torch_device, on_progress)
            written, stale = writer.bytes_written, writer.removed_stale
        return SurgerySummary(
            operation=operation,
            output=str(target),
            device=str(torch_device),
            dry_run=dry_run,
            tensors=len(plan.steps),
            changed=len(plan.changed),
            bytes_written=written,
            seconds=time.perf_counter() - started,
            plan=plan,
            copied_files=tuple(copied),
            skipped_files=tuple(skipped),
            removed_temporaries=tuple(str(p) for p in stale),
        )


@contextlib.contextmanager
def _opened(
    base: PathLike, adapters: Sequence[PathLike], alpha: float | None
) -> Iterator[tuple[Checkpoint, list[Adapter]]]:
    loaded: list[Adapter] = []
    with Checkpoint.open(Path(base)) as ckpt:
        try:
            for path in adapters:
                loaded.append(load_adapter(Path(path), alpha))
            yield ckpt, loaded
        finally:
            for adapter in loaded:
                adapter.source.close()


def default_output(ckpt: Checkpoint, operation: str) -> Path:
    """`<base name>-merged[.safetensors]` in the current directory, mirroring the base's layout."""
    suffix = f"-{operation}d"
    if ckpt.layout == "file":
        return Path.cwd() / f"{ckpt.path.stem}{suffix}.safetensors"
    return Path.cwd() / f"{ckpt.root.resolve().name}{suffix}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorasurgeonError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise LorasurgeonError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(device)


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise LorasurgeonError(
            f"--weight was given {len(weights)} times for {count} adapters; give it once per adapter"
        )
    return [float(w) for w in weights]


def _dtype(dtype: str) -> str | None:
    if dtype not in DTYPE_CHOICES:
        raise LorasurgeonError(f"--dtype {dtype}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[dtype]
