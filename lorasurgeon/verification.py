"""verify: prove that MERGED is BASE plus the adapters, tensor by tensor, and that its companion files agree.

The merge's own plan (plan.plan_surgery) says what every tensor should be: copied (no adapter touches it), or
round(BASE + Σ wᵢ·ΔWᵢ), or an adapter's replacement, or DoRA-rescaled. For each step, BASE's and MERGED's tensors
are read (one pair at a time: flat memory, as the merge), the reference E is computed by the merge's own code
(surgery.compute), and verdict.judge_tensor says how MERGED stands against it, in ulps of the stored dtype: exact,
within tolerance, adapter not applied, wrong scale (with the fitted c), changed without an adapter, dtype or shape
changed, or mismatch. Tensors of the plan that MERGED lacks are `missing`, tensors MERGED holds beyond it `extra`.
config.json, generation_config.json and the tokenizer files are compared by companions.py. Everything proven:
`VerifySummary.ok`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lorasurgeon.adapter import Adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.companions import FileVerdict, compare
from lorasurgeon.errors import LorasurgeonError, MismatchError, Option
from lorasurgeon.plan import Plan, Step, plan_surgery
from lorasurgeon.progress import Progress
from lorasurgeon.verdict import DEFAULT_TOLERANCE, Verdict, VerdictKind
from lorasurgeon.verify_steps import VerifyExecution, distributed_verdicts, journal_folder
from lorasurgeon.verify_task import judge

if TYPE_CHECKING:
    from lorasurgeon.cluster import WorkReport

TensorKind = VerdictKind | Literal["missing", "extra"]


@dataclass(frozen=True)
class TensorCheck:
    """One tensor's verdict: `kind` (a verdict, or missing / extra), the numbers behind it (`verdict`, None for a
    missing or extra tensor), and the adapters that change it."""

    name: str
    kind: TensorKind
    adapters: tuple[str, ...] = ()
    verdict: Verdict | None = None
    layouts: tuple[str, str] = ("", "")  # BASE's and MERGED's dtype and shape ("BF16 [64, 64]")

    @property
    def proven(self) -> bool:
        return self.verdict is not None and self.verdict.proven

    @property
    def message(self) -> str:
        """One sentence saying what was found, naming the tensor."""
        v, by = self.verdict, ", ".join(self.adapters)
        verb = "changes" if len(self.adapters) == 1 else "change"
        if self.kind == "missing":
            return f"{self.name}: missing from MERGED" + (f" (changed by {by})" if by else "")
        if self.kind == "extra":
            return f"{self.name}: extra: MERGED holds it, and the merge of BASE writes no such tensor"
        if v is None or self.kind in ("dtype changed", "shape changed"):
            return f"{self.name}: {self.kind}: BASE has {self.layouts[0]}, MERGED {self.layouts[1]}"
        ulps = f"up to {v.max_ulps:.3g} ulps off, {v.over_tolerance} of {v.elements} elements beyond the tolerance"
        return {
            "exact": f"{self.name}: exact",
            "within tolerance": f"{self.name}: within tolerance (up to {v.max_ulps:.3g} ulps)",
            "adapter not applied": f"{self.name}: adapter not applied: MERGED equals BASE, but {by} {verb} it",
            "wrong scale": f"{self.name}: wrong scale: MERGED − BASE is {v.scale or 0:.3g}·ΔW, not ΔW ({ulps})",
            "changed without an adapter": f"{self.name}: changed without an adapter: no adapter touches it, but "
            f"MERGED differs from BASE",
        }.get(self.kind, f"{self.name}: mismatch: MERGED is not BASE + ΔW at any scale ({ulps})")


@dataclass(frozen=True)
class VerifySummary:
    """What verify found: every tensor of the plan and every extra one, and the companion files."""

    merged: str
    base: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    tolerance: int
    tensors: tuple[TensorCheck, ...]
    files: tuple[FileVerdict, ...]
    seconds: float
    work: WorkReport | None = None  # with a cluster or --resume: where the tensors were verified, retried, resumed
    resumed_from: str | None = None  # the journal an interrupted run left, when verdicts were taken from it

    @property
    def problems(self) -> list[TensorCheck | FileVerdict]:
        """Everything not proven: the tensors first, then the files."""
        return [*(t for t in self.tensors if not t.proven), *(f for f in self.files if not f.proven)]

    @property
    def ok(self) -> bool:
        return not self.problems


def run(
    merged_path: Path,
    base: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    tolerance: int = DEFAULT_TOLERANCE,
    on_progress: Callable[[Progress], None] | None = None,
    execution: VerifyExecution | None = None,
) -> VerifySummary:
    """Verify MERGED against the plan of merging `adapters` at `weights` into `base`; for lorasurgeon.verify().
    With `execution` (a cluster, or resume), each tensor is one task (lorasurgeon.verify_steps): the same verdicts.

    Raises MismatchError when the adapters do not fit the base (there is then no merge to verify against), and
    LorasurgeonError for a negative tolerance.
    """
    started = time.perf_counter()
    if tolerance < 0:
        raise LorasurgeonError(Option("tolerance", tolerance), ": must be 0 or more ulps")
    plan = plan_surgery("merge", base, adapters, weights)
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more problems; run `lorasurgeon check`)" if len(plan.errors) > 1 else ""
        raise MismatchError(*plan.errors[0].parts, more)
    work, resumed_from = None, None
    with Checkpoint.open(merged_path) as merged:
        if execution is None:
            checks = _tensors(plan, merged, tolerance, on_progress)
        else:
            inputs = [base.path, *(a.path for a in adapters)]
            folder = journal_folder(merged_path, inputs, weights, tolerance)
            verdicts, work = distributed_verdicts(plan, merged, tolerance, execution, folder, on_progress)
            checks = [_check(plan, step, merged, v) for step, v in zip(plan.steps, verdicts, strict=True)]
            resumed_from = str(folder) if work.resumed else None
        planned = {s.tensor.name for s in plan.steps}
        checks += [TensorCheck(name, "extra") for name in merged.tensors if name not in planned]
        files = compare(base.root, merged.root, plan.config)
    return VerifySummary(
        merged=str(merged_path),
        base=str(base.path),
        adapters=tuple(str(a.path) for a in adapters),
        weights=tuple(weights),
        tolerance=tolerance,
        tensors=tuple(checks),
        files=tuple(files),
        seconds=time.perf_counter() - started,
        work=work,
        resumed_from=resumed_from,
    )


def _tensors(
    plan: Plan, merged: Checkpoint, tolerance: int, on_progress: Callable[[Progress], None] | None
) -> list[TensorCheck]:
    out = []
    total = sum(s.tensor.nbytes for s in plan.steps)
    done = 0
    for index, step in enumerate(plan.steps):
        found = merged.tensors.get(step.tensor.name)
        verdict = None if found is None else judge(plan, step, merged.read(found), tolerance)
        out.append(_check(plan, step, merged, verdict))
        done += step.tensor.nbytes
        if on_progress:
            on_progress(Progress(index + 1, len(plan.steps), done, total, "comparing"))
    return out


def _check(plan: Plan, step: Step, merged: Checkpoint, verdict: Verdict | None) -> TensorCheck:
    """The step's TensorCheck from its verdict (None: MERGED lacks the tensor), with the adapters that change it."""
    used = [t.adapter for t in step.terms] + [t.adapter for t in step.tuners]
    names = tuple(dict.fromkeys(str(plan.adapters[i].path) for i in used))
    names += tuple(str(plan.adapters[s.adapter].path) for s in (step.replacement, *step.rows) if s is not None)
    found = merged.tensors.get(step.tensor.name)
    if found is None or verdict is None:
        return TensorCheck(step.tensor.name, "missing", names)
    layouts = (f"{step.tensor.dtype} {list(step.tensor.shape)}", f"{found.dtype} {list(found.shape)}")
    return TensorCheck(step.tensor.name, verdict.kind, names, verdict, layouts)
