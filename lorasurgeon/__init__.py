"""lorasurgeon: LoRA surgery on safetensors checkpoint files.

The public API is plain functions over paths; each returns a summary dataclass and never prints:

    >>> from lorasurgeon import merge
    >>> summary = merge("base/", ["adapter/"], "merged/")          # doctest: +SKIP
    >>> summary.changed                                             # doctest: +SKIP
    14
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon.adapter import Adapter, load_adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, MismatchError
from lorasurgeon.report import Report, make_report, parse_rule

# The modules that compute load torch, whose import takes seconds; a header-only `report` needs none of them,
# so they are imported inside the functions that use them, and the types below on first use (__getattr__).
if TYPE_CHECKING:
    import torch

    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary
    from lorasurgeon.plan import Plan
    from lorasurgeon.surgery import Progress, SurgerySummary
LAZY_TYPES = {
    "ConvertSummary": "lorasurgeon.conversion",
    "ExtractSummary": "lorasurgeon.extraction",
    "Progress": "lorasurgeon.surgery",
    "SurgerySummary": "lorasurgeon.surgery",
}

__all__ = [
    "ConvertSummary",
    "ExtractSummary",
    "LorasurgeonError",
    "Progress",
    "Report",
    "SurgerySummary",
    "check",
    "convert",
    "extract",
    "merge",
    "report",
    "unmerge",
]

DTYPE_CHOICES = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
PathLike = str | Path


def __getattr__(name: str) -> Any:
    if name in LAZY_TYPES:
        return getattr(importlib.import_module(LAZY_TYPES[name]), name)
    raise AttributeError(f"module 'lorasurgeon' has no attribute {name!r}")


def check(base: PathLike, adapters: Sequence[PathLike], *, alpha: float | None = None) -> Plan:
    """Check that the adapters fit the base checkpoint; returns the Plan, whose `findings` say what is wrong.

    Raises LorasurgeonError only for input that cannot be read at all.
    """
    from lorasurgeon.plan import plan_surgery

    with _opened(base, adapters, alpha) as (ckpt, loaded):
        return plan_surgery("merge", ckpt, loaded, [1.0] * len(loaded))


def report(
    path: PathLike,
    *,
    base: PathLike | None = None,
    stats: bool = False,
    fail_on: Sequence[str] = (),
    on_progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Describe a checkpoint (any layout) or an adapter (PEFT, kohya, diffusers) from its headers.

    `base`: also run `check` against it and count the base parameters the adapter touches. `stats`: read
    every tensor once (NaN/Inf, min/max/mean/std, ΔW norms and stable ranks); `nan`/`inf` rules imply it.
    `fail_on`: rules (nan, inf, mismatch, rank>N, params>N, dtype!=X, dtype==X); those that hold are in
    `Report.fired`. Raises LorasurgeonError for an unknown rule, InputError for unreadable input.

    >>> report("samples/adapter-lora", fail_on=["rank>4"]).fired[0].rule  # doctest: +SKIP
    'rank>4'
    """
    rules = [parse_rule(text) for text in fail_on]
    return make_report(Path(path), Path(base) if base is not None else None, stats, rules, on_progress)


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
    allow_nonfinite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> SurgerySummary:
    """Write base + Σ weight_i · scale · ΔW_i to `out` (default: `<base>-merged` in the current directory).

    Each tensor gets the sum of its deltas in fp32, rounded once to its dtype (or `dtype`: keep, fp32,
    fp16, bf16). Raises MismatchError when the adapters do not fit, OutputError when `out` cannot be
    written, NumericError when a result would not be finite.
    """
    return _surgery(
        "merge", base, adapters, out, weights, scale, alpha, device, dtype, force, dry_run, allow_nonfinite, on_progress
    )


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
    allow_nonfinite: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> SurgerySummary:
    """Write merged − scale · ΔW to `out` (default: `<merged>-unmerged`). Exact only up to rounding:
    in bf16 a merge followed by an unmerge leaves about one ulp of difference on some elements."""
    return _surgery(
        "unmerge",
        merged,
        [adapter],
        out,
        None,
        scale,
        alpha,
        device,
        dtype,
        force,
        dry_run,
        allow_nonfinite,
        on_progress,
    )


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
    allow_nonfinite: bool,
    on_progress: Callable[[Progress], None] | None,
) -> SurgerySummary:
    from lorasurgeon.plan import plan_surgery
    from lorasurgeon.surgery import SurgerySummary, execute
    from lorasurgeon.writer import CheckpointWriter

    started = time.perf_counter()
    weights = _weights(weights, len(adapters))
    torch_device = resolve_device(device)
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        plan = plan_surgery(operation, ckpt, loaded, weights, scale, _dtype(dtype), allow_nonfinite)
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


def extract(
    base: PathLike,
    tuned: PathLike,
    out: PathLike | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    alpha: float | None = None,
    method: str = "auto",
    targets: Sequence[str] = (),
    include_embeddings: bool = False,
    skip_mismatched: bool = False,
    curve: Sequence[int] = (),
    save_changed_vectors: bool = False,
    device: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> ExtractSummary:
    """Write a PEFT LoRA adapter directory approximating `tuned` − `base` (default `<tuned>-lora`).

    Per target matrix (2-D weights, linear projections unless `targets` globs or `re:` regexes say otherwise)
    ΔW is factorised by truncated SVD at `rank`, or at the smallest rank keeping `energy` of ‖ΔW‖²_F (at most
    `max_rank`); `method` is auto, exact or randomized (see lorasurgeon.extraction). `curve` adds the relative
    error at those ranks. `save_changed_vectors` stores the modules whose 1-D tensors (norms) changed as PEFT
    modules_to_save. Raises MismatchError when names or shapes differ (unless `skip_mismatched`),
    NothingChangedError (exit code 1) when no target differs, OutputError when `out` cannot be written.

    >>> extract("base/", "tuned/", "lora/", rank=16).total_error  # doctest: +SKIP
    0.41
    """
    from lorasurgeon.extraction import ExtractOptions
    from lorasurgeon.extraction import run as run_extract

    options = ExtractOptions(
        rank,
        energy,
        max_rank,
        alpha,
        method,
        tuple(targets),
        include_embeddings,
        skip_mismatched,
        tuple(curve),
        save_changed_vectors,
    )
    options.validate(dry_run)
    torch_device = resolve_device(device)
    out_path = Path(out) if out is not None else None
    return run_extract(Path(base), Path(tuned), out_path, options, torch_device, force, dry_run, on_progress)


def convert(
    adapter: PathLike,
    out: PathLike | None = None,
    *,
    to: str,
    base: PathLike | None = None,
    component: str | None = None,
    alpha: float | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> ConvertSummary:
    """Write `adapter` (PEFT, kohya or diffusers) in the format `to` (peft, kohya, diffusers) with the same ΔW.

    A and B are copied byte for byte; names and the scale convention are rewritten (see lorasurgeon.conversion).
    OUT is a PEFT directory or one .safetensors file (default `<adapter>-<to>` in the current directory).
    `base` resolves kohya names (required from kohya) and can name kohya modules; `component` (unet,
    text_encoder, ..., or a kohya prefix lora_unet, lora_te, lora_te1, lora_te2) names the component of a PEFT
    adapter, or selects one component of a kohya or diffusers file. Raises UnsupportedError naming a tensor the
    target cannot hold, MismatchError when a module does not resolve against `base`, OutputError when `out`
    cannot be written.

    >>> convert("adapter/", "lora.safetensors", to="kohya", component="lora_unet").modules[0].name  # doctest: +SKIP
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    from lorasurgeon.conversion import run as run_convert

    return run_convert(
        Path(adapter),
        Path(out) if out is not None else None,
        to,
        Path(base) if base is not None else None,
        component,
        alpha,
        force,
        dry_run,
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
        return Path(f"{ckpt.path.stem}{suffix}.safetensors")
    return Path(f"{ckpt.root.resolve().name}{suffix}")


def resolve_device(device: str) -> torch.device:
    import torch

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
