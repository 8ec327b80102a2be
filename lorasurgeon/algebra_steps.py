"""Resize's and combine's per-module steps seen from the driver: one self-contained task per module of OUT
(lorasurgeon.algebra_task), run here or on a Ray cluster (lorasurgeon.cluster), taken from an interrupted run's
journal where it has them and kept in it as they arrive, then collected in plan order for the writer.

What a per-module task cannot express is refused by name before anything is read: a global `params` budget on a
cluster (every module's spectrum is needed before any rank is chosen), and `resume` into a one-file OUT (the
journal lives in a directory OUT's temporary).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lorasurgeon.adapter import AdapterFormat, LoraModule
from lorasurgeon.algebra_options import AlgebraOptions
from lorasurgeon.algebra_task import AlgebraTask, ModuleOutcome, Rank, outcome_entry, outcome_of, run_algebra_task
from lorasurgeon.cluster import Resources, WorkReport, parse_cluster, run_steps
from lorasurgeon.combination import Combination, Job, Term
from lorasurgeon.errors import LorasurgeonError, Option, UnsupportedError
from lorasurgeon.extract_steps import Execution
from lorasurgeon.header import TensorInfo
from lorasurgeon.journal import Journal
from lorasurgeon.matrix_task import Stamp, file_stamp


def execution_of(cluster: str | None, threads: int | None, resume: bool) -> Execution:
    """How the per-module tasks run, checked before any adapter is read."""
    if threads is not None and threads < 1:
        raise LorasurgeonError(Option("threads", threads), ": must be at least 1")
    return Execution(parse_cluster(cluster) if cluster else None, threads, resume)


def refuse(options: AlgebraOptions, to: AdapterFormat, execution: Execution) -> None:
    """UnsupportedError naming what the per-module steps cannot run exactly."""
    if execution.cluster is not None and options.params is not None:
        raise UnsupportedError(
            Option("cluster", execution.cluster.label), " with ", Option("params", options.params),
            ": one parameter budget needs every module's spectrum before any module's rank is chosen, which "
            "independent per-module tasks do not share; run it without --cluster, or give a per-module rule "
            "(--rank, --energy, --ratio, --fro)",
        )  # fmt: skip
    if execution.resume and to != "peft":
        raise UnsupportedError(
            Option("resume", flag=True), f": keeps the computed modules inside OUT's temporary directory, and a {to} "
            "OUT is one file; write PEFT (--to peft), or run without --resume",
        )  # fmt: skip


def algebra_tasks(
    plan: Combination,
    adapters: int,
    options: AlgebraOptions,
    ranks: list[Rank],
    device: torch.device,
    execution: Execution,
) -> list[AlgebraTask]:
    """One task per job: absolute paths and the files' stamps, the device by type on a cluster."""
    stamps: dict[Path, Stamp] = {}
    where = device.type if execution.cluster is not None else str(device)
    threads = execution.threads or torch.get_num_threads()
    density = options.density if options.density is not None else 1.0
    tasks = []
    for job, rank in zip(plan.jobs, ranks, strict=True):
        placed = _absolute(job)
        files = sorted({info.path for term in placed.terms for info in term.module.tensors})
        for path in files:
            if path not in stamps:
                stamps[path] = file_stamp(path)
        pinned = tuple((path, stamps[path]) for path in files)
        settings = (density, options.seed, options.report_naive)
        tasks.append(AlgebraTask(placed, adapters, options.method, rank, *settings, pinned, where, threads))
    return tasks


def run_modules(tasks: list[AlgebraTask], execution: Execution, journal: Journal | None) -> tuple[
    list[ModuleOutcome], WorkReport
]:  # fmt: skip
    """Every task's outcome in plan order: those in `journal` taken from it, the others computed here or on the
    cluster and kept in the journal as each arrives."""
    kept = journal.keys() if journal is not None else set()
    outcomes: list[ModuleOutcome | None] = []
    for task in tasks:
        entry = journal.get(task.key()) if journal is not None and task.key() in kept else None
        outcomes.append(outcome_of(*entry) if entry is not None else None)
    todo = [i for i, o in enumerate(outcomes) if o is None]

    def add(position: int, outcome: ModuleOutcome) -> None:
        index = todo[position]
        if journal is not None:
            journal.put(tasks[index].key(), *outcome_entry(outcome))
        outcomes[index] = outcome

    cpu = torch.device(tasks[0].device).type == "cpu" if tasks else True
    report = run_steps(
        run_algebra_task,
        [tasks[i] for i in todo],
        add,
        cluster=execution.cluster,
        resources=Resources(cpus=tasks[0].threads if cpu and tasks else 1, gpus=0 if cpu else 1),
        name=lambda task: task.job.name,
    )
    done = [o for o in outcomes if o is not None]
    return done, replace(report, resumed=len(tasks) - len(todo))


def _absolute(job: Job) -> Job:
    terms = tuple(Term(t.adapter, _module_at(t.module), t.weight) for t in job.terms)
    return replace(job, terms=terms)


def _module_at(module: LoraModule) -> LoraModule:
    bias = _at(module.bias) if module.bias is not None else None
    return replace(module, a=_at(module.a), b=_at(module.b), bias=bias)


def _at(info: TensorInfo) -> TensorInfo:
    return info._replace(path=info.path.absolute())
