"""Extract's per-matrix steps seen from the driver: one self-contained task per pair (lorasurgeon.matrix_task),
run here or on a Ray cluster (lorasurgeon.cluster), taken from an interrupted run's journal where it has them
and kept in it as they arrive, then collected in plan order; and the other tensors, compared here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorasurgeon.cluster import Cluster, Resources, WorkReport, run_steps
from lorasurgeon.decomposition import MatrixResult
from lorasurgeon.errors import NothingChangedError
from lorasurgeon.formats import peft
from lorasurgeon.journal import Journal
from lorasurgeon.matrix_task import (
    MatrixOutcome,
    MatrixTask,
    Stamp,
    file_stamp,
    outcome_entry,
    outcome_of,
    run_matrix_task,
)
from lorasurgeon.pairing import ExtractOptions, ExtractPlan
from lorasurgeon.progress import Progress


@dataclass(frozen=True)
class ChangedTensor:
    """A tensor that differs between BASE and TUNED but is not in the adapter (norms, biases, heads)."""

    name: str
    shape: tuple[int, ...]
    max_change: float


@dataclass(frozen=True)
class Execution:
    """How the per-matrix steps run: here or on a Ray `cluster`, with `threads` torch threads per matrix (None:
    torch's count in this process; the factors' bits depend on it), `resume` from an interrupted run's journal."""

    cluster: Cluster | None = None
    threads: int | None = None
    resume: bool = False


@dataclass(frozen=True)
class Decomposed:
    results: list[MatrixResult]
    factors: dict[str, torch.Tensor]  # PEFT-keyed fp32 factors
    changed: list[ChangedTensor]
    work: WorkReport


def decompose_pairs(
    plan: ExtractPlan,
    options: ExtractOptions,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None = None,
    execution: Execution = Execution(),
    journal: Journal | None = None,
) -> Decomposed:
    """Decompose every pair, one task per matrix (lorasurgeon.matrix_task), here or on the cluster; results
    already in `journal` are taken from it, and each new one is added to it as it arrives.

    Targets whose ΔW is zero are left out of the results. Raises NothingChangedError when every target is unchanged.
    """
    tasks = matrix_tasks(plan, options, device, execution)
    collected = _Collected(plan, tasks, journal, on_progress)
    todo = [i for i, o in enumerate(collected.outcomes) if o is None]
    cpu = device.type == "cpu"
    report = run_steps(
        run_matrix_task,
        [tasks[i] for i in todo],
        lambda position, outcome: collected.add(todo[position], outcome),
        cluster=execution.cluster,
        resources=Resources(cpus=tasks[0].threads if cpu else 1, gpus=0 if cpu else 1),
        name=lambda task: task.tuned.name,
    )
    results = [o.result for o in collected.outcomes if o is not None and o.result is not None]
    factors: dict[str, torch.Tensor] = {}
    for task, o in zip(tasks, collected.outcomes, strict=True):
        if o is not None and o.b is not None and o.a is not None:
            factors.update(peft.factor_tensors(task.module, task.kind, o.b, o.a))
    changed = _changed_others(plan, device, on_progress)
    if not results:
        differ = f"; only {len(changed)} other tensors differ (e.g. {changed[0].name})" if changed else ""
        raise NothingChangedError(
            f"{plan.tuned.path}: every target matrix equals BASE {plan.base.path}, so there is nothing to "
            f"extract{differ}"
        )
    return Decomposed(results, factors, changed, replace(report, resumed=len(tasks) - len(todo)))


class _Collected:
    """The outcomes in plan order: those found in the journal at the start, then each one as it arrives (kept
    in the journal at once), with the progress they make."""

    def __init__(
        self,
        plan: ExtractPlan,
        tasks: list[MatrixTask],
        journal: Journal | None,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.tasks, self.journal, self.on_progress = tasks, journal, on_progress
        kept = journal.keys() if journal is not None else set()
        entries = [journal.get(t.key()) if journal is not None and t.key() in kept else None for t in tasks]
        self.outcomes = [outcome_of(*entry) if entry is not None else None for entry in entries]
        self.total = len(tasks)
        self.work = sum(_nbytes(t) for t in tasks)
        self.done = sum(o is not None for o in self.outcomes)
        self.bytes = sum(_nbytes(t) for t, o in zip(tasks, self.outcomes, strict=True) if o is not None)
        if on_progress:  # the first SVD can take a while: say so before it starts
            on_progress(Progress(self.done, self.total, self.bytes, self.work, "decomposing"))

    def add(self, index: int, outcome: MatrixOutcome) -> None:
        task = self.tasks[index]
        if self.journal is not None:
            self.journal.put(task.key(), *outcome_entry(outcome))
        self.outcomes[index] = outcome
        self.done, self.bytes = self.done + 1, self.bytes + _nbytes(task)
        if self.on_progress:
            self.on_progress(Progress(self.done, self.total, self.bytes, self.work, "decomposing"))


def _nbytes(task: MatrixTask) -> int:
    return task.base.nbytes + task.tuned.nbytes


def matrix_tasks(
    plan: ExtractPlan, options: ExtractOptions, device: torch.device, execution: Execution
) -> list[MatrixTask]:
    """One self-contained task per pair: absolute paths and the files' stamps (a worker's cwd is not ours),
    the device by type on a cluster (a worker's GPU is whichever Ray gave it)."""
    stamps: dict[Path, Stamp] = {}
    where = device.type if execution.cluster is not None else str(device)
    threads = execution.threads or torch.get_num_threads()
    tasks = []
    for pair in plan.pairs:
        base, tuned = (info._replace(path=info.path.absolute()) for info in (pair.base, pair.tuned))
        for info in (base, tuned):
            if info.path not in stamps:
                stamps[info.path] = file_stamp(info.path)
        pinned = (stamps[base.path], stamps[tuned.path])
        tasks.append(
            MatrixTask(pair.module, pair.kind, pair.transpose, base, tuned, pinned, options.rule, where, threads)
        )
    return tasks


def _changed_others(
    plan: ExtractPlan, device: torch.device, on_progress: Callable[[Progress], None] | None
) -> list[ChangedTensor]:
    total, work = len(plan.others), sum(b.nbytes + t.nbytes for b, t in plan.others)
    index = done = 0
    changed = []
    for b, t in plan.others:
        old, new = plan.base.read(b), plan.tuned.read(t)
        if old.dtype == new.dtype and torch.equal(old, new):  # the common case, decided without fp32 copies
            diff = 0.0
        elif b.is_float and t.is_float and t.numel:
            diff = float((new.to(device, torch.float32) - old.to(device, torch.float32)).abs().max().item())
        else:
            diff = 1.0
        del old, new
        if diff:
            changed.append(ChangedTensor(t.name, t.shape, float(diff)))
        index, done = index + 1, done + b.nbytes + t.nbytes
        if on_progress:
            on_progress(Progress(index, total, done, work, "comparing"))
    return changed
