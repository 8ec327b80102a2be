"""Run a Plan: read one base tensor, add its adapter terms in fp32, round once, write it; repeat.

Only the tensor in hand (and its factors) is resident. Untouched tensors are copied byte for byte.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorasurgeon import linalg, lycoris, step_checks, terms, tuner_steps
from lorasurgeon.adapter import Adapter
from lorasurgeon.checkpoint import MODEL_CONFIG, Checkpoint
from lorasurgeon.devices import torch_threads
from lorasurgeon.errors import MismatchError
from lorasurgeon.header import torch_dtype
from lorasurgeon.mirror import copy_companions, output_bytes, output_index, output_metadata
from lorasurgeon.placement import Term
from lorasurgeon.plan import Operation, Plan, Step, plan_surgery
from lorasurgeon.progress import Phase, Progress
from lorasurgeon.quantized_steps import Requantized, Work
from lorasurgeon.read_ahead import ReadAhead, computed
from lorasurgeon.shard_stream import ShardStream
from lorasurgeon.workspace import Workspace
from lorasurgeon.writer import CheckpointWriter

SIGNS = {"merge": 1, "unmerge": -1}
PHASES: dict[Operation, Phase] = {"merge": "merging", "unmerge": "unmerging"}


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
    survival figures of the quantized weights merged in format into `figures`.

    Three things overlap: a reader thread reads the next computed tensor, this thread computes the current one,
    and the shard stream's worker writes the previous one (file I/O and torch ops release the GIL).
    """
    base = plan.base
    total_bytes = sum(s.tensor.nbytes for s in plan.steps)
    done_tensors = done_bytes = 0
    writer.reserve(output_bytes(plan))
    phase = PHASES[plan.operation]
    if on_progress:
        on_progress(Progress(0, len(plan.steps), 0, total_bytes, phase))
    # A CPU merge runs each block on one torch thread: its cache-sized blocks are too small to share out (two
    # threads took longer on a 2-core machine), and the reader and writer threads need the other cores.
    threads = torch_threads(1 if device.type == "cpu" else torch.get_num_threads())
    work = Work.of(plan, device, SIGNS[plan.operation])
    with Workspace(device) as workspace, ReadAhead(plan, workspace) as ahead, threads:
        for shard in base.shards:
            steps = [s for s in plan.steps if s.shard == shard.name]
            entries = [(s.tensor.name, s.out_dtype, s.tensor.shape) for s in steps]
            with writer.shard(shard.name, entries, output_metadata(shard.header.metadata, plan)) as stream:
                for step in steps:
                    _write_step(plan, step, stream, device, ahead, workspace, work)
                    done_tensors += 1
                    done_bytes += step.tensor.nbytes
                    if on_progress:
                        on_progress(Progress(done_tensors, len(plan.steps), done_bytes, total_bytes, phase))
    (figures if figures is not None else []).extend(work.requantizer.figures.values())
    if on_progress:
        on_progress(Progress(phase="publishing"))
    if base.index_name:
        writer.write_json(base.index_name, output_index(plan))
    if plan.config is not None:
        writer.write_json(MODEL_CONFIG, plan.config)
    if base.layout == "file":
        return [], []
    return copy_companions(base.root, plan, writer)


def _write_step(
    plan: Plan,
    step: Step,
    stream: ShardStream,
    device: torch.device,
    ahead: ReadAhead,
    workspace: Workspace,
    work: Work,
) -> None:
    """Write one step's tensor: computed, copied, or passed over when it was written ahead. After a quantized step,
    the other rewritten parts of its weight still to come in this shard are written ahead, not kept till then."""
    if stream.written_ahead(step.tensor.name):
        stream.skip()
    elif step.quantized is not None:
        stream.write(work.requantizer.compute(step, ahead.take_parts(step)))
        for name, tensor in work.requantizer.take_kept(stream.later).items():
            stream.write_ahead(name, tensor)
    elif computed(step):
        stream.write(compute(plan, step, device, ahead.take(step), workspace, work))
    else:
        stream.copy_from(plan.base, step.tensor)


def compute(
    plan: Plan,
    step: Step,
    device: torch.device,
    weight: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    work: Work | None = None,
) -> torch.Tensor:
    """The step's output tensor: W (or its replacement, with token rows set) ± Σ term deltas in fp32 (LoRA and
    additive tuners alike), rescaled per output feature when the term is DoRA, or changed by the one tuner product
    the step may hold (tuner_steps), rounded once to the output dtype. `weight` is the base tensor when it has
    been read already; `workspace` lends output buffers and compute threads; `work` holds the factors read so far
    and the quantized weights' state (a quantized weight's part is merged in its format)."""
    work = work or Work.of(plan, device, SIGNS[plan.operation])
    if step.quantized is not None:
        return work.requantizer.compute(step)
    weight = (_start(plan, step) if weight is None else weight).to(device)
    out_dtype = torch_dtype(step.out_dtype)
    if not (step.terms or step.tuners):  # copied in a new dtype, or replaced: values from the adapter are checked too
        result = weight.to(out_dtype)
        if not linalg.fits(weight.float(), out_dtype):
            step_checks.check_finite(plan, step, weight, weight.float(), result)
        return result
    fast = _blockwise(plan, step, weight, out_dtype, workspace, work)
    if fast is not None:
        return fast
    # The terms are added in place: `weight` is a buffer of our own (read fresh), so an fp32 base is reused
    # as it is, and a bf16/fp16 one is up-cast once and then dropped.
    exact = weight.float()
    del weight
    # The weighted deltas are summed first and added once, so several adapters add no rounding between them.
    if step.terms or tuner_steps.has_sum(step):
        delta = summed_delta(plan, step, device)
        linalg.add_delta_(exact, delta, SIGNS[plan.operation])
        if step.expected is not None:
            step_checks.check_restored(plan, step, exact, delta)
        del delta
    exact = tuner_steps.apply_products(plan, step, exact, device)
    dora = next((t for t in step.terms if t.dora), None)
    if dora is not None and dora.module.magnitude is not None:
        magnitude = plan.adapters[dora.adapter].source.read(dora.module.magnitude).to(device)
        if dora.module.dora == "lycoris":  # LyCORIS' dora_scale: its own axis and an epsilon (FORMATS.md §5.3)
            exact = lycoris.weight_decompose(exact, magnitude)
        else:
            exact = linalg.dora_rescale(exact, magnitude, 1 if dora.transpose else 0)
    result = exact.to(out_dtype)
    if not linalg.fits(exact, out_dtype):
        step_checks.check_finite(plan, step, _start(plan, step), exact, result)
    return terms.checked(step, _start(plan, step), result) if any(t.piece for t in step.terms) else result


def _blockwise(
    plan: Plan, step: Step, weight: torch.Tensor, out_dtype: torch.dtype, workspace: Workspace | None, work: Work
) -> torch.Tensor | None:
    """The step's result merged a block of rows at a time, when its terms are factor pairs (an expert's slice of
    them, or a fused experts tensor one expert at a time) and every value fits; None: take the whole-tensor
    route, which finds and names a NaN, Inf or out-of-range value."""
    if step.expected is not None or step.tuners:  # an unmerge's expected value is checked on the whole ΔW
        return None
    sign = SIGNS[plan.operation]
    if all(terms.blockwise(t) for t in step.terms):  # LoRA pairs, or an expert's slice of them
        factors = [work.factors.matrices(term) for term in step.terms]
        out, parallel = (workspace.output(weight, out_dtype), workspace.parallel) if workspace else (None, None)
        result, fit = linalg.merge_blockwise(weight, factors, sign, out_dtype, out=out, parallel=parallel)
    elif terms.fused_experts(step):
        result, fit = terms.merge_fused(work.factors, step, weight, sign, out_dtype)
    else:
        return None
    return terms.checked(step, weight, result) if fit else None


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


def summed_delta(plan: Plan, step: Step, device: torch.device) -> torch.Tensor:
    """Σ of the step's term deltas in fp32; a term with `rows` (q, k or v of a fused in_proj_weight) fills only
    those rows, so the three projections' deltas still meet in one tensor that is added once."""
    whole = (_delta(plan, t, device) for t in step.terms if t.rows is None)
    deltas = itertools.chain(whole, tuner_steps.deltas(plan, step, device))  # one at a time, as they are added
    delta = next(deltas, None)
    delta = torch.zeros(step.tensor.shape, device=device) if delta is None else delta
    for other in deltas:
        delta += other
    for term in step.terms:
        if term.rows is not None:
            delta[term.rows[0] : term.rows[1]] += _delta(plan, term, device)
    return delta


def _delta(plan: Plan, term: Term, device: torch.device) -> torch.Tensor:
    """One term's ΔW in fp32, laid out like the tensor it changes (a lora_B bias: factor · b)."""
    source = plan.adapters[term.adapter].source
    module = term.module
    if term.piece is not None:  # an experts module's slice, or its whole fused delta
        return terms.Factors(plan, device).delta(term)
    if term.bias and module.bias is not None:
        return source.read(module.bias).to(device).float().mul_(term.factor)
    if module.factors:
        factors = {role: source.read(info).to(device) for role, info in module.factors.items()}
        return lycoris.delta(module.kind, factors, term.factor, term.shape)
    a, b = source.read(module.a).to(device), source.read(module.b).to(device)
    if module.kind == "conv":
        return linalg.conv_delta(a, b, term.factor)
    # flatten(1) squeezes 1×1 conv factors that the plan applies to a Linear base; matrices stay as they are.
    return linalg.lora_delta(a.flatten(1), b.flatten(1), term.factor, term.transpose)
