"""One tensor of a verify as a self-contained task: plain data in, the small Verdict out.

A `VerifyTask` is the merge plan's `Step` for the tensor (its BASE tensor and every adapter tensor it reads, each a
TensorInfo: path and byte range), MERGED's tensor, the stamp (size, mtime) of every file those name, the tolerance
and the torch threads. `run_verify_task` checks the stamps, reads through a reader of those paths, and calls `judge`,
the very function the local verify calls: the merge's own arithmetic (surgery.compute and summed_delta) over a
one-step plan made on the worker from the task, never shipped. So a verdict is the same bits wherever it is computed
(the thread count travels with the task, because a matrix product's last bits depend on it).

Only steps whose whole input is named by TensorInfos can be tasks: LoRA (and LyCORIS) terms, DoRA, replacements and
token rows, or nothing at all. A non-LoRA PEFT tuner (its terms read the adapter's config), a MoE experts term (the
plan's expert self-test spans steps) and a quantized weight merged in its format (the requantizer's state spans
steps) are refused by name (`task_refusal`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.devices import torch_threads
from lorasurgeon.errors import InputError
from lorasurgeon.header import TensorInfo
from lorasurgeon.matrix_task import Stamp, file_stamp
from lorasurgeon.placement import Source
from lorasurgeon.plan import Plan, Step
from lorasurgeon.surgery import compute, summed_delta
from lorasurgeon.verdict import Verdict, judge_tensor

CPU = torch.device("cpu")


@dataclass(frozen=True)
class VerifyTask:
    """Everything one tensor's verdict needs, picklable and free of open files and of the plan."""

    step: Step  # the merge plan's step: BASE's tensor and the adapter terms, each tensor by path and byte range
    merged: TensorInfo
    adapters: tuple[tuple[str, AdapterFormat], ...]  # (path, format) of each adapter, as the plan indexes them
    stamps: tuple[tuple[str, Stamp], ...]  # of every file read, when planned
    tolerance: int
    threads: int  # torch intra-op threads

    def key(self) -> str:
        """What the verdict depends on, hashed: every tensor's name and place, the files' stamps, the step's terms,
        the tolerance, the threads and the torch version. A journal entry under another key is never used for it."""
        text = json.dumps([repr(self.step), repr(self.merged), self.stamps, self.tolerance, self.threads])
        return hashlib.blake2b(f"{text}{torch.__version__}".encode(), digest_size=16).hexdigest()


def task_refusal(step: Step) -> str | None:
    """Why the step cannot run as a task (a phrase naming its kind), or None when it can."""
    if step.quantized is not None:
        return "a quantized weight merged in its own format (FP8, compressed-tensors)"
    if step.tuners:
        return "a PEFT tuner other than LoRA"
    if any(t.piece is not None for t in step.terms):
        return "LoRA on MoE experts"
    return None


def absolute(step: Step) -> Step:
    """The step with every tensor's path made absolute, here on the driver (a worker's cwd is not ours)."""

    def module(m: LoraModule) -> LoraModule:
        factors = {role: _absolute(info) for role, info in m.factors.items()}
        magnitude, bias = (_absolute(t) if t is not None else None for t in (m.magnitude, m.bias))
        return replace(m, a=_absolute(m.a), b=_absolute(m.b), factors=factors, magnitude=magnitude, bias=bias)

    def source(s: Source) -> Source:
        return replace(s, tensor=_absolute(s.tensor))

    return replace(
        step,
        tensor=_absolute(step.tensor),
        terms=tuple(replace(t, module=module(t.module)) for t in step.terms),
        replacement=source(step.replacement) if step.replacement is not None else None,
        rows=tuple(source(r) for r in step.rows),
    )


def _absolute(info: TensorInfo) -> TensorInfo:
    return info._replace(path=info.path.absolute())


def step_files(step: Step, merged: TensorInfo) -> list[Path]:
    """Every file the step and MERGED's tensor are read from, once each, in order."""
    infos = [step.tensor, merged, *(i for t in step.terms for i in t.module.tensors)]
    infos += [s.tensor for s in (step.replacement, *step.rows) if s is not None]
    return list(dict.fromkeys(i.path for i in infos))


def run_verify_task(task: VerifyTask) -> Verdict:
    """The verdict of MERGED's tensor against the merge's reference (see module doc). InputError when a file is not
    the one planned from (before or after the reading: on a cluster, every node must see the same files)."""
    _check_stamps(task)
    reader = Checkpoint(path=task.merged.path, layout="file", root=task.merged.path.parent, shards=())
    adapters = tuple(Adapter(Path(p), fmt, {}, (), reader) for p, fmt in task.adapters)
    plan = Plan("merge", reader, adapters, (1.0,) * len(adapters), (task.step,), ())  # reads by path, nothing more
    with reader, torch_threads(task.threads):
        verdict = judge(plan, task.step, reader.read(task.merged), task.tolerance)
    _check_stamps(task)
    return verdict


def judge(plan: Plan, step: Step, merged: torch.Tensor, tolerance: int) -> Verdict:
    """One step's verdict: MERGED against BASE and the reference the merge computes for the step."""
    base = plan.base.read(step.tensor)
    if not step.touched or merged.shape != base.shape or merged.dtype != base.dtype:
        return judge_tensor(base, merged, None, tolerance)
    expected = compute(plan, step, CPU)  # read afresh: the merge may add in place into what it reads
    additive = all(t.additive for t in step.tuners) and not any(t.dora for t in step.terms)
    if additive and step.replacement is None and not step.rows:
        delta = summed_delta(plan, step, CPU)  # Σ wᵢ·ΔWᵢ in fp32 (LoRA and additive tuners), laid out like the tensor
    else:  # a replacement, token rows, DoRA or a product tuner: the change itself is what the merge makes of it
        delta = (expected.double() - base.double()).float()
    return judge_tensor(base, merged, delta, tolerance, expected=expected)


def _check_stamps(task: VerifyTask) -> None:
    for path, stamp in task.stamps:
        try:
            now = file_stamp(path)
        except OSError as e:
            raise InputError(f"{path}: cannot read it here: {e.strerror or e}") from None
        if now != stamp:
            raise InputError(
                f"{path}: is not the file the verify was planned from (size or mtime changed, or another node sees "
                "another file at this path); every node must read the same checkpoints"
            )
