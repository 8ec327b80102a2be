"""The API functions that write an adapter from checkpoints or from another adapter: `extract` and `convert`
(re-exported by `__init__`, like algebra's `resize` and `combine`). Cheap to import: the modules that compute load
torch and are imported inside the functions, once the arguments have been checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.devices import check_device, resolve_device
from lorasurgeon.errors import LorasurgeonError, Option
from lorasurgeon.progress import Progress

if TYPE_CHECKING:
    from lorasurgeon.conversion import ConvertSummary
    from lorasurgeon.extraction import ExtractSummary

PathLike = str | Path


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
    patterns: bool = False,
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
    task type of its architecture, so that AutoPeftModel loads it, with one lora_alpha and lora_alpha / rᵢ folded
    into the factors (`patterns`: PEFT's alpha_pattern instead). `cluster` ("ray" or "ray:ADDRESS") runs one
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
        patterns=patterns,
    )
    options.validate(dry_run)
    if threads is not None and threads < 1:
        raise LorasurgeonError(Option("threads", threads), ": must be at least 1")
    parsed = parse_cluster(cluster) if cluster else None
    check_device(device)
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
    to: str | None = None,
    base: PathLike | None = None,
    component: str | None = None,
    alpha: float | None = None,
    base_name: str | None = None,
    patterns: bool = False,
    runtime: str | None = None,
    server: Mapping[str, Any] | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> ConvertSummary:
    """Write `adapter` (PEFT, kohya or diffusers) in the format `to` (peft, kohya, diffusers) with the same ΔW.

    PEFT configs get one lora_alpha and B′ = B·sᵢ·rᵢ/α where it does not give a module its scale (`folded`);
    other factors (all, with `patterns`: PEFT's own form) are copied byte for byte. `runtime` (one of RUNTIMES)
    lowers it for that runtime and its `server` options (as `check`), refusing what has no exact lowering. OUT:
    a PEFT directory or one .safetensors file (default `<adapter>-<to>`). `base` resolves kohya names; `component`
    (unet, ..., lora_unet, lora_te, ...) names a PEFT adapter's (else `base`'s layout does) or picks one of a file;
    a PEFT output names its base (`base_name`, else `base`). Raises UnsupportedError naming a tensor the target
    cannot hold, MismatchError when a module does not resolve against `base`, OutputError when `out` cannot be
    written (lorasurgeon.conversion).

    >>> convert("adapter/", "lora.safetensors", to="kohya", component="lora_unet").modules[0].name  # doctest: +SKIP
    'lora_unet_down_blocks_0_attentions_0_proj_in'
    """
    from lorasurgeon.conversion import ConvertOptions
    from lorasurgeon.conversion import run as run_convert

    where = Path(base) if base is not None else None
    options = ConvertOptions(to, where, component, alpha, base_name, patterns, runtime, server or {})
    return run_convert(Path(adapter), Path(out) if out is not None else None, options, force=force, dry_run=dry_run)
