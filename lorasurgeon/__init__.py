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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter
from lorasurgeon.adapter_api import convert, extract
from lorasurgeon.arguments import DTYPE_CHOICES, adapter_weights, output_dtype, output_path
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.cluster import parse_cluster
from lorasurgeon.devices import check_device, resolve_device
from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.formats import load_adapter
from lorasurgeon.formats.naming import COMPONENTS
from lorasurgeon.progress import Progress
from lorasurgeon.report import Report, make_report
from lorasurgeon.rules import RULE_HELP, judge, parse_rule
from lorasurgeon.runtime_rules import RUNTIMES
from lorasurgeon.runtimes import judge_adapters
from lorasurgeon.version import __version__

# The modules that compute load torch, whose import takes seconds; a header-only `report` needs none of them,
# so they are imported inside the functions that use them, and the types below on first use (__getattr__).
if TYPE_CHECKING:
    from lorasurgeon.algebra import AlgebraSummary, combine, resize
    from lorasurgeon.combination import METHODS
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary
    from lorasurgeon.plan import Plan
    from lorasurgeon.surgery import SurgerySummary
    from lorasurgeon.verification import VerifySummary
LAZY_TYPES = {  # and two functions: resize and combine are lorasurgeon.algebra's, with their full signatures
    "AlgebraSummary": "lorasurgeon.algebra",
    "METHODS": "lorasurgeon.combination",
    "combine": "lorasurgeon.algebra",
    "resize": "lorasurgeon.algebra",
    "ConvertSummary": "lorasurgeon.conversion",
    "ExtractSummary": "lorasurgeon.extraction",
    "SurgerySummary": "lorasurgeon.surgery",
    "VerifySummary": "lorasurgeon.verification",
}

__all__ = [
    "ADAPTER_FORMATS",
    "COMPONENTS",
    "DTYPE_CHOICES",
    "METHODS",
    "RULE_HELP",
    "RUNTIMES",
    "AlgebraSummary",
    "ConvertSummary",
    "ExtractSummary",
    "LorasurgeonError",
    "Progress",
    "Report",
    "SurgerySummary",
    "VerifySummary",
    "__version__",
    "check",
    "combine",
    "convert",
    "extract",
    "merge",
    "report",
    "resize",
    "unmerge",
    "verify",
]

PathLike = str | Path


def __getattr__(name: str) -> Any:
    if name in LAZY_TYPES:
        return getattr(importlib.import_module(LAZY_TYPES[name]), name)
    raise AttributeError(f"module 'lorasurgeon' has no attribute {name!r}")


def check(
    base: PathLike,
    adapters: Sequence[PathLike],
    *,
    alpha: float | None = None,
    target: str | None = None,
    server: Mapping[str, Any] | None = None,
) -> Plan:
    """Check that the adapters fit the base checkpoint; returns the Plan, whose `findings` say what is wrong.

    `target` (one of RUNTIMES) also judges each adapter by that runtime's rules (lorasurgeon.runtimes), one error
    per module and rule broken, naming the rule and its source; `server` gives the server's options (runtimes.OPTIONS:
    max_lora_rank, world_size, ...). Raises LorasurgeonError for unreadable input or an unknown runtime or option."""
    from lorasurgeon.plan import plan_surgery

    with _opened(base, adapters, alpha) as (ckpt, loaded):
        plan = plan_surgery("merge", ckpt, loaded, [1.0] * len(loaded))
        found = judge_adapters(target, loaded, ckpt, server or {}) if target is not None else []
        return replace(plan, findings=(*plan.findings, *found))


def verify(
    merged: PathLike,
    base: PathLike,
    adapters: Sequence[PathLike],
    *,
    weights: Sequence[float] | None = None,
    alpha: float | None = None,
    tolerance: int = 1,
    cluster: str | None = None,
    resume: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> VerifySummary:
    """Prove that `merged` is round(base + Σ weight_i · ΔW_i) within `tolerance` ulps of each tensor's dtype and that
    its config, generation config and tokenizer agree: a verdict per tensor (lorasurgeon.verification), `ok` only
    when all are proven. Raises MismatchError when the adapters do not fit the base.

    `cluster` ("ray" or "ray:ADDRESS") verifies one tensor per Ray task (the inputs on storage every node sees at
    the same path); `resume` continues an interrupted run from the verdicts it kept (lorasurgeon.verify_steps: a
    hidden folder beside MERGED, removed once the run completes). Both give the same verdicts as the local run and
    fill `VerifySummary.work`; a step they cannot run as a task (a non-LoRA tuner, MoE experts, a quantized weight
    merged in format) is refused by name (UnsupportedError)."""
    factors = adapter_weights(weights, len(adapters))
    parsed = parse_cluster(cluster) if cluster else None
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        from lorasurgeon.verification import run as run_verify  # torch: only once the inputs have been read
        from lorasurgeon.verify_steps import VerifyExecution

        execution = VerifyExecution(parsed, resume) if parsed is not None or resume else None
        return run_verify(Path(merged), ckpt, loaded, factors, tolerance, on_progress, execution)


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
    stats = stats or any(rule.name in ("nan", "inf") for rule in rules)
    described = make_report(Path(path), Path(base) if base is not None else None, stats, on_progress)
    return replace(described, fired=tuple(judge(described, rules)))


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
    written, NumericError when a result would not be finite. `on_progress` gets a Progress per phase and tensor.
    """
    out_dtype, factors = output_dtype(dtype), adapter_weights(weights, len(adapters))
    check_device(device)
    if on_progress:
        on_progress(Progress(phase="planning"))
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        from lorasurgeon.surgery import SurgeryOptions, run  # torch: only once the inputs have been read

        options = SurgeryOptions(scale, alpha, resolve_device(device), out_dtype, force, dry_run, allow_nonfinite)
        inputs = [Path(base), *(Path(a) for a in adapters)]
        target = output_path(ckpt, out, "merge")
        return run("merge", ckpt, loaded, target, inputs, factors, options, on_progress)


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
    out_dtype = output_dtype(dtype)
    check_device(device)
    if on_progress:
        on_progress(Progress(phase="planning"))
    with _opened(merged, [adapter], alpha) as (ckpt, loaded):
        from lorasurgeon.surgery import SurgeryOptions, run  # torch: only once the inputs have been read

        options = SurgeryOptions(scale, alpha, resolve_device(device), out_dtype, force, dry_run, allow_nonfinite)
        inputs = [Path(merged), Path(adapter)]
        return run("unmerge", ckpt, loaded, output_path(ckpt, out, "unmerge"), inputs, [1.0], options, on_progress)


@contextlib.contextmanager
def _opened(
    base: PathLike, adapters: Sequence[PathLike], alpha: float | None
) -> Iterator[tuple[Checkpoint, list[Adapter]]]:
    loaded: list[Adapter] = []
    with Checkpoint.open(Path(base)) as ckpt:
        try:
            for path in adapters:
                loaded.append(load_adapter(Path(path), alpha, scan_values=True))
            yield ckpt, loaded
        finally:
            for adapter in loaded:
                adapter.source.close()
