"""Run a Plan: read one base tensor, add its adapter terms in fp32, round once, write it; repeat.

Only the tensor in hand (and its factors) is resident. Untouched tensors are copied byte for byte.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasurgeon import linalg, lycoris
from lorasurgeon.adapter import Adapter
from lorasurgeon.checkpoint import MODEL_CONFIG, Checkpoint
from lorasurgeon.errors import MismatchError, NonfiniteWarning, NumericError, Option, Part
from lorasurgeon.header import torch_dtype
from lorasurgeon.mirror import copy_companions, output_bytes, output_index, output_metadata
from lorasurgeon.plan import Operation, Plan, Step, plan_surgery
from lorasurgeon.quantized_steps import Requantized, Requantizer
from lorasurgeon.terms import Factors, blockwise, fused_experts, merge_fused, unchanged_experts
from lorasurgeon.writer import CheckpointWriter

SIGNS = {"merge": 1, "unmerge": -1}
READ_AHEAD_BYTES = 256 << 20


@dataclass(frozen=True)
class Progress:
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class SurgeryOptions:
    """How merge and unmerge run: `scale` on every adapter's own scale, `alpha` for files without one, the torch
    `device`, the output `dtype` (a safetensors dtype name; None keeps each tensor's), and the safety switches."""

    scale: float = 1.0
    alpha: float | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str | None = None
    force: bool = False
    dry_run: bool = False
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class SurgerySummary:
    """What a merge or unmerge did (or, with dry_run, would do)."""

    operation: Operation
    output: str
    device: str
    dry_run: bool
    tensors: int
    changed: int
    bytes_written: int
    seconds: float
    plan: Plan = field(repr=False)
    copied_files: tuple[str, ...] = ()
    skipped_files: tuple[str, ...] = ()
    removed_temporaries: tuple[str, ...] = ()
    requantized: tuple[Requantized, ...] = ()  # quantized weights merged in format, with their survival figures


def run(
    operation: Operation,
    base: Checkpoint,
    adapters: list[Adapter],
    out: Path,
    inputs: list[Path],
    weights: list[float],
    options: SurgeryOptions,
    on_progress: Callable[[Progress], None] | None = None,
) -> SurgerySummary:
    """Plan, refuse on any error finding, then (unless a dry run) write OUT atomically; for lorasurgeon.merge()."""
    started = time.perf_counter()
    plan = plan_surgery(operation, base, adapters, weights, options.scale, options.dtype, options.allow_nonfinite)
    if plan.errors:
        more = (
            (f" (and {len(plan.errors) - 1} more problems; run `lorasurgeon check`)",) if len(plan.errors) > 1 else ()
        )
        raise MismatchError(*plan.errors[0].parts, *more)
    copied: list[str] = []
    skipped: list[str] = []
    figures: list[Requantized] = []
    written = 0
    stale: list[Path] = []
    if not options.dry_run:
        is_dir = base.layout != "file"
        with CheckpointWriter(out, is_dir=is_dir, inputs=inputs, force=options.force) as writer:
            copied, skipped = execute(plan, writer, options.device, on_progress, figures)
        written, stale = writer.bytes_written, writer.removed_stale
    return SurgerySummary(
        operation=operation,
        output=str(out),
        device=str(options.device),
        dry_run=options.dry_run,
        tensors=len(plan.steps),
        changed=len(plan.changed),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        plan=plan,
        copied_files=tuple(copied),
        skipped_files=tuple(skipped),
        removed_temporaries=tuple(str(p) for p in stale),
        requantized=tuple(figures),
    )


def execute(
    plan: Plan,
    writer: CheckpointWriter,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None = None,
    figures: list[Requantized] | None = None,
) -> tuple[list[str], list[str]]:
    """Write every step of `plan` through `writer`; returns (files copied, weight files skipped), and puts the
    survival figures of quantized weights merged in format into `figures`.

    Three things overlap: a reader thread reads the next computed tensor, this thread computes the current one,
    and the shard stream's worker writes the previous one (file I/O and torch ops release the GIL).
    """
    base = plan.base
    total_bytes = sum(s.tensor.nbytes for s in plan.steps)
    done_tensors = done_bytes = 0
    writer.reserve(output_bytes(plan))
    work = Work.of(plan, device)
    with ReadAhead(plan) as ahead, _torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
        for shard in base.shards:
            steps = [s for s in plan.steps if s.shard == shard.name]
            entries = [(s.tensor.name, s.out_dtype, s.tensor.shape) for s in steps]
            with writer.shard(shard.name, entries, output_metadata(shard.header.metadata, plan)) as stream:
                for step in steps:
                    if computed(step):
                        stream.write(compute(plan, step, device, ahead.take(step), work))
                    else:
                        stream.copy_from(base, step.tensor)
                    done_tensors += 1
                    done_bytes += step.tensor.nbytes
                    if on_progress:
                        on_progress(Progress(done_tensors, len(plan.steps), done_bytes, total_bytes))
    if figures is not None:
        figures.extend(work.requantizer.figures.values())
    if base.index_name:
        writer.write_json(base.index_name, output_index(plan))
    if plan.config is not None:
        writer.write_json(MODEL_CONFIG, plan.config)
    if base.layout == "file":
        return [], []
    return copy_companions(base.root, plan, writer)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run with `count` torch threads. A CPU merge uses one: its cache-sized blocks are too small to share out
    (two threads took longer on a 2-core machine), and the reader and writer threads need the other cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def computed(step: Step) -> bool:
    """Whether the step's tensor is computed (and rounded), rather than copied byte for byte."""
    return step.touched or step.quantized is not None or step.out_dtype != step.tensor.dtype


@dataclass(frozen=True)
class Work:
    """What the steps of one run share: the adapter factors read so far, and the quantized weights' state."""

    factors: Factors
    requantizer: Requantizer

    @classmethod
    def of(cls, plan: Plan, device: torch.device) -> Work:
        factors = Factors(plan, device)
        return cls(factors, Requantizer(plan, factors, SIGNS[plan.operation]))


class ReadAhead:
    """Reads the base tensor of the next computed step on a worker thread while the current one is computed.

    Only tensors of up to READ_AHEAD_BYTES are read ahead, so a huge one (an embedding) never sits in memory
    beside another; they, and steps that start from an adapter's tensor, are read when their turn comes.
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._pending: tuple[Step, Future[torch.Tensor]] | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasurgeon-reader")
        # id(step) -> the first later step to read ahead, or None
        self._following: dict[int, Step | None] = {}
        upcoming = None
        for step in reversed(plan.steps):
            self._following[id(step)] = upcoming
            if computed(step) and _base_start(step) and step.tensor.nbytes <= READ_AHEAD_BYTES:
                upcoming = step

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)

    def take(self, step: Step) -> torch.Tensor | None:
        """`step`'s base tensor if it was read ahead (else None); starts reading the next one."""
        weight = None
        if self._pending is not None and self._pending[0] is step:
            weight = self._pending[1].result()
            self._pending = None
        upcoming = self._following[id(step)]
        if self._pending is None and upcoming is not None:
            self._pending = (upcoming, self._reader.submit(self._plan.base.read, upcoming.tensor))
        return weight


def _base_start(step: Step) -> bool:
    return step.replacement is None and not step.rows and step.quantized is None


def compute(
    plan: Plan, step: Step, device: torch.device, weight: torch.Tensor | None = None, work: Work | None = None
) -> torch.Tensor:
    """The step's output tensor: W (or its replacement, with token rows set) ± Σ term deltas in fp32,
    rescaled per output feature when the term is DoRA, rounded once to the output dtype; a quantized weight's
    part merged in its format. `weight` is the base tensor when it has been read already."""
    work = work or Work.of(plan, device)
    if step.quantized is not None:
        return work.requantizer.compute(step)
    weight = (_start(plan, step) if weight is None else weight).to(device)
    out_dtype = torch_dtype(step.out_dtype)
    if not step.terms:  # copied in a new dtype, or replaced: values from the adapter are checked too
        result = weight.to(out_dtype)
        if not linalg.fits(weight.float(), out_dtype):
            _check_finite(plan, step, weight, weight.float(), result)
        return result
    sign, fit = SIGNS[plan.operation], False
    if all(blockwise(t) for t in step.terms):
        factors = [work.factors.matrices(term) for term in step.terms]
        result, fit = linalg.merge_blockwise(weight, factors, sign, out_dtype)
    elif fused_experts(step):
        result, fit = merge_fused(work.factors, step, weight, sign, out_dtype)
    if fit:
        before = weight
    else:  # not blockwise, or something is NaN, Inf or out of range: the whole-tensor route names it
        # The terms are added in place: `weight` is a buffer of our own (read fresh), so an fp32 base is reused
        # as it is, and a bf16/fp16 one is up-cast once and then dropped.
        exact = weight.float()
        del weight
        result = _whole(plan, step, exact, work.factors, out_dtype)
        before = _start(plan, step) if any(t.piece is not None for t in step.terms) else result
    if any(t.piece is not None for t in step.terms):
        _check_experts(step, before, result)
    return result


def _whole(plan: Plan, step: Step, exact: torch.Tensor, factors: Factors, out_dtype: torch.dtype) -> torch.Tensor:
    """The whole-tensor route on fp32 W (`exact`, changed in place): the summed deltas added once, DoRA's
    rescaling, one rounding."""
    # The weighted deltas are summed first and added once, so several adapters add no rounding between them.
    delta = factors.summed(step)
    linalg.add_delta_(exact, delta, SIGNS[plan.operation])
    del delta
    dora = next((t for t in step.terms if t.dora), None)
    if dora is not None and dora.module.magnitude is not None:
        magnitude = factors.read(dora.adapter, dora.module.magnitude)
        if dora.module.dora == "lycoris":  # LyCORIS' dora_scale: its own axis and an epsilon (FORMATS.md §5.3)
            exact = lycoris.weight_decompose(exact, magnitude)
        else:
            exact = linalg.dora_rescale(exact, magnitude, 1 if dora.transpose else 0)
    result = exact.to(out_dtype)
    if not linalg.fits(exact, out_dtype):
        _check_finite(plan, step, _start(plan, step), exact, result)
    return result


def _check_experts(step: Step, before: torch.Tensor, result: torch.Tensor) -> None:
    """The self-test: a targeted expert whose stored values the merge leaves as they were is an error."""
    unchanged = unchanged_experts(step, before, result)
    if unchanged:
        raise NumericError(
            f"{step.tensor.path.name}: {step.tensor.name}: the merge leaves {unchanged[0]} unchanged (its ΔW is "
            f"zero, or below the {step.out_dtype} step everywhere); lorasurgeon never leaves a targeted expert "
            "silently unchanged"
        )


def _start(plan: Plan, step: Step) -> torch.Tensor:
    """The value the terms are added to: the base tensor, or the adapter tensor that replaces it, with any
    trainable-token rows set (in fp32, so the output is rounded once)."""
    if step.replacement is None:
        weight = plan.base.read(step.tensor)
    else:
        weight = plan.adapters[step.replacement.adapter].source.read(step.replacement.tensor)
    if not step.rows:
        return weight
    weight = weight.float()
    for rows in step.rows:
        indices = torch.tensor(rows.indices or (), dtype=torch.long)
        weight[indices] = plan.adapters[rows.adapter].source.read(rows.tensor).float()
    return weight


def _check_finite(plan: Plan, step: Step, weight: torch.Tensor, exact: torch.Tensor, result: torch.Tensor) -> None:
    """The slow path, taken only when linalg.fits found a problem: refuse NaN/Inf carried from the base or
    its replacement (`weight`, read again) or produced by the sum (`plan.allow_nonfinite`: warn, by name, through
    NonfiniteWarning); overflow of the output dtype is always an error."""
    name = f"{step.tensor.path.name}: {step.tensor.name}"
    overflow = linalg.overflow_count(exact, result)
    if overflow:
        raise NumericError(
            f"{name}: {overflow} values overflow {step.out_dtype} after adding the adapter "
            f"(largest magnitude {exact.abs().max().item():.4g})"
        )
    bad_in, bad_out = linalg.nonfinite_count(weight), linalg.nonfinite_count(result)
    if bad_in:
        origin = (
            "the base tensor" if step.replacement is None else f"{step.replacement.tensor.name}, which replaces it,"
        )
        origin += " (with its trainable-token rows)" if step.rows else ""
        problem = f"{origin} holds {bad_in} NaN/Inf values, which the {step.out_dtype} result would carry"
    elif bad_out:
        problem = f"the result holds {bad_out} NaN/Inf values"
    else:
        return
    allow: Part = Option("allow_nonfinite", flag=True)
    if not plan.allow_nonfinite:
        raise NumericError(f"{name}: {problem}; fix the input or pass ", allow)
    warnings.warn(NonfiniteWarning(f"{name}: {problem}; written anyway (", allow, ")"), stacklevel=2)
