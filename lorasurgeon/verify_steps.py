"""verify's per-tensor steps seen from the driver, for --cluster and --resume: one self-contained task per tensor
(lorasurgeon.verify_task), run here or on a Ray cluster (lorasurgeon.cluster), taken from an interrupted run's
journal where it has them and kept in it as they arrive, then collected in plan order.

Where the journal lives: verify writes no OUT, so there is no temporary sibling to keep it in. It is a hidden folder
beside MERGED, `.lorasurgeon-verify-<hash>`, the hash of the resolved MERGED, BASE and adapter paths, the weights and
the tolerance: the same command finds it again, another command (other inputs) never does, and it sits on the
storage that already holds MERGED (big enough, and seen by the user who runs the verify). A run without --resume
starts it afresh; a completed run, or one that failed on its inputs (a run again would fail the same way), removes
it; an interrupted one (^C, a kill, a lost cluster) keeps it. Each entry's key holds the stamps (size, mtime) of the
files its tensor is read from, so a verdict of a changed file is never taken: it is computed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.cluster import Cluster, Resources, WorkReport, run_steps
from lorasurgeon.errors import InputError, MismatchError, NumericError, Option, UnsupportedError
from lorasurgeon.journal import Journal
from lorasurgeon.matrix_task import Stamp, file_stamp
from lorasurgeon.plan import Plan
from lorasurgeon.progress import Progress
from lorasurgeon.verdict import Verdict
from lorasurgeon.verify_task import VerifyTask, absolute, run_verify_task, step_files, task_refusal

JOURNAL_PREFIX = ".lorasurgeon-verify-"


@dataclass(frozen=True)
class VerifyExecution:
    """How verify's steps run: on a Ray `cluster` (None: here), and whether to `resume` from an interrupted run."""

    cluster: Cluster | None = None
    resume: bool = False


def journal_folder(merged: Path, inputs: Sequence[Path], weights: Sequence[float], tolerance: int) -> Path:
    """The hidden folder beside MERGED where this verify's verdicts are kept (see module doc)."""
    text = json.dumps([str(merged.resolve()), *(str(p.resolve()) for p in inputs), list(weights), tolerance])
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return merged.absolute().parent / f"{JOURNAL_PREFIX}{digest}"


def distributed_verdicts(
    plan: Plan,
    merged: Checkpoint,
    tolerance: int,
    execution: VerifyExecution,
    folder: Path,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[list[Verdict | None], WorkReport]:
    """The verdict of each step of `plan` (None where MERGED lacks the tensor), one task per tensor, here or on
    the cluster; verdicts already in the journal at `folder` are taken from it. Raises UnsupportedError naming the
    first step that cannot be a task, before any work."""
    tasks = _tasks(plan, merged, tolerance)
    if not execution.resume:
        shutil.rmtree(folder, ignore_errors=True)
    collected = _Collected(plan, tasks, Journal(folder), on_progress)
    todo = [i for i, t in enumerate(tasks) if t is not None and collected.verdicts[i] is None]
    try:
        report = run_steps(
            run_verify_task,
            [t for t in (tasks[i] for i in todo) if t is not None],
            lambda position, verdict: collected.add(todo[position], verdict),
            cluster=execution.cluster,
            # One CPU per task, whatever the threads: a task asking for more CPUs than any node has would never
            # be scheduled, and a tensor's verdict is a light pass over memory (B @ A of rank r, then compares).
            resources=Resources(cpus=1),
            name=lambda task: task.merged.name,
        )
    except (InputError, MismatchError, NumericError, UnsupportedError):
        shutil.rmtree(folder, ignore_errors=True)  # the inputs are at fault: a resumed run would meet it again
        raise
    shutil.rmtree(folder, ignore_errors=True)  # complete: nothing left to resume
    return collected.verdicts, replace(report, resumed=sum(t is not None for t in tasks) - len(todo))


class _Collected:
    """The verdicts in plan order: those the journal holds for these very tasks, then each one as it arrives (kept
    in the journal at once), with the progress they make."""

    def __init__(
        self,
        plan: Plan,
        tasks: list[VerifyTask | None],
        journal: Journal,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.plan, self.tasks, self.journal, self.on_progress = plan, tasks, journal, on_progress
        kept = journal.keys()
        entries = [journal.get(t.key()) if t is not None and t.key() in kept else None for t in tasks]
        self.verdicts: list[Verdict | None] = [Verdict(**e[1]) if e is not None else None for e in entries]
        self.total = sum(s.tensor.nbytes for s in plan.steps)
        settled = [t is None or v is not None for t, v in zip(tasks, self.verdicts, strict=True)]  # missing: none
        self.done = sum(settled)
        self.bytes = sum(s.tensor.nbytes for s, ok in zip(plan.steps, settled, strict=True) if ok)
        self._report()

    def add(self, index: int, verdict: Verdict) -> None:
        task = self.tasks[index]
        if task is not None:
            self.journal.put(task.key(), {}, asdict(verdict))
        self.verdicts[index] = verdict
        self.done, self.bytes = self.done + 1, self.bytes + self.plan.steps[index].tensor.nbytes
        self._report()

    def _report(self) -> None:
        if self.on_progress:
            self.on_progress(Progress(self.done, len(self.tasks), self.bytes, self.total, "comparing"))


def _tasks(plan: Plan, merged: Checkpoint, tolerance: int) -> list[VerifyTask | None]:
    """One task per step that MERGED holds (None where it lacks the tensor), with absolute paths and the files'
    stamps (a worker's cwd is not ours)."""
    adapters = tuple((str(a.path), a.format) for a in plan.adapters)
    threads = torch.get_num_threads()
    stamps: dict[Path, Stamp] = {}
    tasks: list[VerifyTask | None] = []
    for step in plan.steps:
        found = merged.tensors.get(step.tensor.name)
        if found is None:
            tasks.append(None)
            continue
        why = task_refusal(step)
        if why is not None:
            raise UnsupportedError(
                f"{step.tensor.path}: {step.tensor.name} is changed by {why}, which verify cannot run as a task yet; "
                "verify it without ",
                Option("cluster", metavar="…"),
                " and ",
                Option("resume", flag=True),
            )
        step, found = absolute(step), found._replace(path=found.path.absolute())
        files = step_files(step, found)
        for path in files:
            if path not in stamps:
                stamps[path] = file_stamp(path)
        pinned = tuple((str(p), stamps[p]) for p in files)
        tasks.append(VerifyTask(step, found, adapters, pinned, tolerance, threads))
    return tasks
