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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.devices import check_device as _check_device
from lorasurgeon.devices import resolve_device
from lorasurgeon.errors import LorasurgeonError, Option
from lorasurgeon.formats import load_adapter
from lorasurgeon.formats.naming import COMPONENTS
from lorasurgeon.progress import Progress
from lorasurgeon.report import Report, make_report
from lorasurgeon.rules import RULE_HELP, judge, parse_rule
from lorasurgeon.version import __version__

# The modules that compute load torch, whose import takes seconds; a header-only `report` needs none of them,
# so they are imported inside the functions that use them, and the types below on first use (__getattr__).
if TYPE_CHECKING:
    from lorasurgeon.algebra import AlgebraSummary, combine, resize
    from lorasurgeon.combination import METHODS
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary
    from lorasurgeon.plan import Operation, Plan
    from lorasurgeon.surgery import SurgerySummary
LAZY_TYPES = {  # and two functions: resize and combine are lorasurgeon.algebra's, with their full signatures
    "AlgebraSummary": "lorasurgeon.algebra",
    "METHODS": "lorasurgeon.combination",
    "combine": "lorasurgeon.algebra",
    "resize": "lorasurgeon.algebra",
    "ConvertSummary": "lorasurgeon.conversion",
    "ExtractSummary": "lorasurgeon.extraction",
    "SurgerySummary": "lorasurgeon.surgery",
}

__all__ = [
    "ADAPTER_FORMATS",
    "COMPONENTS",
    "DTYPE_CHOICES",
    "METHODS",
    "RULE_HELP",
    "AlgebraSummary",
    "ConvertSummary",
    "ExtractSummary",
    "LorasurgeonError",
    "Progress",
    "Report",
    "SurgerySummary",
    "__version__",
    "check",
    "combine",
    "convert",
    "extract",
    "merge",
    "report",
    "resize",
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
    out_dtype, factors = _dtype(dtype), _weights(weights, len(adapters))
    _check_device(device)
    if on_progress:
        on_progress(Progress(phase="planning"))
    with _opened(base, adapters, alpha) as (ckpt, loaded):
        from lorasurgeon.surgery import SurgeryOptions, run  # torch: only once the inputs have been read

        options = SurgeryOptions(scale, alpha, resolve_device(device), out_dtype, force, dry_run, allow_nonfinite)
        inputs = [Path(base), *(Path(a) for a in adapters)]
        target = _output(ckpt, out, "merge")
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
    out_dtype = _dtype(dtype)
    _check_device(device)
    if on_progress:
        on_progress(Progress(phase="planning"))
    with _opened(merged, [adapter], alpha) as (ckpt, loaded):
        from lorasurgeon.surgery import SurgeryOptions, run  # torch: only once the inputs have been read

        options = SurgeryOptions(scale, alpha, resolve_device(device), out_dtype, force, dry_run, allow_nonfinite)
        inputs = [Path(merged), Path(adapter)]
        return run("unmerge", ckpt, loaded, _output(ckpt, out, "unmerge"), inputs, [1.0], options, on_progress)


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
    base_name: str | None = None,
    device: str = "auto",
    cluster: str | None = None,
    threads: int | None = None,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> ExtractSummary:
    """Write a PEFT LoRA adapter directory approximating `tuned` − `base` (default `<tuned>-lora`).

    Per target matrix (2-D weights, linear projections unless `targets` globs or `re:` regexes say otherwise)
    ΔW is factorised by truncated SVD at `rank`, or at the smallest rank keeping `energy` of ‖ΔW‖²_F (at most
    `max_rank`); `method` is auto, exact or randomized (see lorasurgeon.extraction). `curve` adds the relative
    error at those ranks. `save_changed_vectors` stores the modules whose 1-D tensors (norms) changed as PEFT
    modules_to_save. The adapter names its base as `base_name` (a Hub repo id, say), else `base` as given, and the
    task type of its architecture, so that AutoPeftModel loads it. `cluster` ("ray" or "ray:ADDRESS") runs one
    Ray task per matrix, reading the checkpoints from a path every node sees; `threads` is the torch threads per
    matrix (default: this process's count; the factors are bit-identical for the same threads and device type,
    here or on any worker); `resume` continues an interrupted run from the matrices it computed (checked against
    the inputs' sizes and mtimes). Raises MismatchError when names or shapes differ (unless `skip_mismatched`),
    NothingChangedError when no target differs, OutputError when `out` cannot be written.

    >>> extract("base/", "tuned/", "lora/", rank=16).total_error  # doctest: +SKIP
    0.41
    """
    from lorasurgeon.cluster import parse_cluster
    from lorasurgeon.pairing import ExtractOptions
    from lorasurgeon.rank_rule import RankRule

    rule = RankRule(rank=rank, energy=energy, max_rank=max_rank, method=method, curve=tuple(curve))
    options = ExtractOptions(
        rule=rule,
        alpha=alpha,
        targets=tuple(targets),
        include_embeddings=include_embeddings,
        skip_mismatched=skip_mismatched,
        save_changed_vectors=save_changed_vectors,
        base_name=base_name,
    )
    options.validate(dry_run)
    if threads is not None and threads < 1:
        raise LorasurgeonError(Option("threads", threads), ": must be at least 1")
    parsed = parse_cluster(cluster) if cluster else None
    _check_device(device)
    if on_progress:
        on_progress(Progress(phase="planning"))
    out_path = Path(out) if out is not None else None
    with Checkpoint.open(Path(base)) as base_ckpt, Checkpoint.open(Path(tuned)) as tuned_ckpt:
        from lorasurgeon.extract_steps import Execution  # torch: only once the inputs have been read
        from lorasurgeon.extraction import run as run_extract

        torch_device = resolve_device(device)
        execution = Execution(parsed, threads, resume)
        return run_extract(
            base_ckpt, tuned_ckpt, out_path, options, torch_device, force, dry_run, on_progress, execution
        )


def convert(
    adapter: PathLike,
    out: PathLike | None = None,
    *,
    to: str,
    base: PathLike | None = None,
    component: str | None = None,
    alpha: float | None = None,
    base_name: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> ConvertSummary:
    """Write `adapter` (PEFT, kohya or diffusers) in the format `to` (peft, kohya, diffusers) with the same ΔW.

    A and B are copied byte for byte; names and the scale convention are rewritten (see lorasurgeon.conversion).
    OUT is a PEFT directory or one .safetensors file (default `<adapter>-<to>` in the current directory).
    `base` resolves kohya names (required from kohya) and can name kohya modules; `component` (unet,
    text_encoder, ..., or a kohya prefix lora_unet, lora_te, lora_te1, lora_te2) names the component of a PEFT
    adapter (without it, the layout of `base` names it: a diffusers `unet/` directory, ...), or selects one
    component of a kohya or diffusers file. A PEFT output names its base (`base_name`, else `base`) and the task
    type of its architecture, so that AutoPeftModel loads it. Raises UnsupportedError naming a tensor the target
    cannot hold, MismatchError when a module does not resolve against `base`, OutputError when `out` cannot be
    written.

    >>> convert("adapter/", "lora.safetensors", to="kohya", component="lora_unet").modules[0].name  # doctest: +SKIP
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    from lorasurgeon.conversion import ConvertOptions
    from lorasurgeon.conversion import run as run_convert

    options = ConvertOptions(to, Path(base) if base is not None else None, component, alpha, base_name)
    return run_convert(Path(adapter), Path(out) if out is not None else None, options, force=force, dry_run=dry_run)


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


def _output(ckpt: Checkpoint, out: PathLike | None, operation: Operation) -> Path:
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
    return Path(f"{ckpt.root.resolve().name}{suffix}")


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise LorasurgeonError(
            Option("weights", cli="weight"),
            f" was given {len(weights)} weights for {count} adapters; give one per adapter",
        )
    return [float(w) for w in weights]


def _dtype(dtype: str) -> str | None:
    if dtype not in DTYPE_CHOICES:
        raise LorasurgeonError(Option("dtype", dtype), f": expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[dtype]
