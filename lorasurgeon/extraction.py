"""Extract a LoRA adapter from a full fine-tune: per matrix ΔW = W_tuned − W_base, truncated SVD, PEFT directory.

Flow: `plan_extract` pairs the two checkpoints' tensors by name from their headers (nothing read, every
mismatch a finding); `decompose_pairs` (lorasurgeon.extract_steps) then runs one task per matrix pair, here or
on a Ray cluster: it reads the pair, forms ΔW in fp32 on the device, factorises it (lorasurgeon.decomposition)
as B·A = U_r·diag(σ_r)·V_rᵀ with √σ in each factor, and returns only the small factors, which the driver keeps
in a journal inside OUT's temporary (for --resume); the PEFT writer (lorasurgeon.formats.peft) then publishes
the adapter directory atomically.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.cluster import WorkReport
from lorasurgeon.decomposition import MatrixResult
from lorasurgeon.errors import Finding, InputError, MismatchError, NothingChangedError, NumericError, UnsupportedError
from lorasurgeon.extract_steps import ChangedTensor, Decomposed, Execution, decompose_pairs
from lorasurgeon.formats import peft
from lorasurgeon.formats.model_classes import auto_mapping, task_type
from lorasurgeon.formats.peft_config_writer import adapter_config, target_modules_for
from lorasurgeon.formats.scale_form import ScaleForm, scale_form
from lorasurgeon.header import TensorInfo
from lorasurgeon.hub import display_name
from lorasurgeon.journal import Journal
from lorasurgeon.pairing import ExtractOptions, ExtractPlan, plan_extract
from lorasurgeon.progress import Progress
from lorasurgeon.writer import CheckpointWriter

JOURNAL = ".lorasurgeon-journal"  # the folder inside OUT's temporary where each computed matrix is kept


def config_of(
    plan: ExtractPlan, results: list[MatrixResult], options: ExtractOptions, saved_modules: list[str], base: str
) -> tuple[dict[str, Any], ScaleForm, float]:
    """adapter_config.json targeting exactly the extracted modules of BASE (PEFT loads the adapter onto BASE), which
    it names (`base`, as given, or options.base_name) with the task type of its architecture, so that AutoPeftModel
    loads it; the scale form it states (formats.scale_form); and the scale s the modules are stated at before any
    fold. By default one lora_alpha (`alpha`, else the most frequent rank) with each module's rᵢ/α folded into its
    factors (s = 1); with `patterns`, s = alpha / r the same for every module through rank_pattern and
    alpha_pattern (alpha = r when no alpha is given)."""
    extracted = [r.module for r in results]
    scale = 1.0
    if options.patterns:
        default_rank = options.rule.rank or Counter(r.rank for r in results).most_common(1)[0][0]
        scale = 1.0 if options.alpha is None else options.alpha / default_rank
        form = scale_form(extracted, [(r.rank, scale * r.rank, scale) for r in results], patterns=True)
    else:
        form = scale_form(extracted, [(r.rank, float(r.rank), 1.0) for r in results], alpha=options.alpha)
    config = plan.base.config or plan.tuned.config or {}
    paths = [n.removesuffix(".weight") for n, i in {**plan.tuned.tensors, **plan.base.tensors}.items() if _matrix(n, i)]
    doc = adapter_config(
        form.modules,
        target_modules=target_modules_for(extracted, paths),
        use_rslora=form.use_rslora,
        fan_in_fan_out=any(p.transpose and p.kind == "linear" for p in plan.pairs),
        modules_to_save=saved_modules,
        base_model=options.base_name or base,
        task_type=task_type(config),
        auto_mapping=auto_mapping(config),
    )
    return doc, form, scale


def multipliers(results: list[MatrixResult], form: ScaleForm, stated: float) -> dict[str, float]:
    """What each factor is multiplied by so that the config's scale gives back B·A = ΔW: √(cᵢ/s) on both A and B
    (s the scale the modules were stated at, cᵢ the fold), which keeps the two factors balanced."""
    out = {}
    for result, factor in zip(results, form.factors, strict=True):
        for key in peft.factor_keys(result.module, result.kind):
            out[key] = math.sqrt(factor / stated)
    return out


def _matrix(name: str, info: TensorInfo) -> bool:
    return name.endswith(".weight") and len(info.shape) == 2


def changed_vectors(
    plan: ExtractPlan, changed: list[ChangedTensor], results: list[MatrixResult]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """save_changed_vectors: modules with a changed 1-D tensor that are not LoRA modules, as PEFT
    modules_to_save (full paths), with every parameter of each read from TUNED (PEFT fails to load a
    modules_to_save module with a parameter missing). A changed bias of a LoRA module is not among them: PEFT
    would then no longer put LoRA on that module; it stays listed in the summary as not in the adapter."""
    lora_modules = {r.module for r in results}
    modules = sorted({c.name.rpartition(".")[0] for c in changed if len(c.shape) == 1} - lora_modules)
    tensors = {
        f"{peft.PEFT_PREFIX}{name}": plan.tuned.read(info)
        for name, info in plan.tuned.tensors.items()
        if name.rpartition(".")[0] in modules
    }
    return modules, tensors


def default_output(tuned: Checkpoint) -> Path:
    """`<tuned name>-lora` in the current directory."""
    stem = tuned.path.name.removesuffix(".index.json").removesuffix(".safetensors")
    return Path.cwd() / f"{(display_name(tuned.root) if tuned.layout == 'dir' else stem)}-lora"


def run(
    base_ckpt: Checkpoint,
    tuned_ckpt: Checkpoint,
    out: Path | None,
    options: ExtractOptions,
    device: torch.device,
    force: bool,
    dry_run: bool,
    on_progress: Callable[[Progress], None] | None,
    execution: Execution | None = None,
) -> ExtractSummary:
    """plan -> decompose -> write, for lorasurgeon.extract() (which opened BASE and TUNED, and closes them); OUT is
    checked before any SVD is computed. OUT's temporary exists from the start, and its journal keeps every matrix
    computed (see `kept_for_resume`)."""
    started = time.perf_counter()
    execution = execution or Execution()
    base, tuned = base_ckpt.path, tuned_ckpt.path
    if base.resolve() == tuned.resolve():
        raise NothingChangedError(f"{tuned}: BASE and TUNED are the same checkpoint, so there is nothing to extract")
    plan = plan_extract(base_ckpt, tuned_ckpt, options)
    target = out if out is not None else default_output(tuned_ckpt)
    record = {"operation": "extract", "base": base_ckpt.path.name, "tuned": tuned_ckpt.path.name}
    writer, resumed_from = None, None
    if dry_run:
        done = decompose_pairs(plan, options, device, on_progress, execution)
        saved, full, config, form, stated = _adapter_parts(plan, done, options, str(base))
    else:
        writer = CheckpointWriter(
            target, is_dir=True, inputs=[base, tuned], force=force, scratch=JOURNAL, resume=execution.resume
        )
        with writer:
            journal = Journal(writer.path(JOURNAL))
            with kept_for_resume(journal):
                done = decompose_pairs(plan, options, device, on_progress, execution, journal)
                saved, full, config, form, stated = _adapter_parts(plan, done, options, str(base))
                if on_progress:
                    on_progress(Progress(phase="publishing"))
                scaled = multipliers(done.results, form, stated)
                peft.write_adapter(writer, done.factors, config, record, full, scaled)
        resumed_from = str(writer.resumed_from) if writer.resumed_from else None
    extracted = {r.module for r in done.results}
    return ExtractSummary(
        base=str(base),
        tuned=str(tuned),
        output=str(target),
        dry_run=dry_run,
        device=str(device),
        matrices=tuple(done.results),
        unchanged=tuple(p.tuned.name for p in plan.pairs if p.module not in extracted),
        saved_modules=tuple(saved),
        changed_other=tuple(done.changed),
        warnings=plan.findings,
        curve=options.rule.curve,
        config=config,
        folded=form.folded,
        bytes_written=writer.bytes_written if writer is not None else 0,
        seconds=time.perf_counter() - started,
        work=done.work,
        resumed_from=resumed_from,
    )


def _adapter_parts(
    plan: ExtractPlan, done: Decomposed, options: ExtractOptions, base: str
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, Any], ScaleForm, float]:
    """(modules_to_save, their full tensors, adapter_config.json naming `base`, its scale form, the stated scale)."""
    saved, full = changed_vectors(plan, done.changed, done.results) if options.save_changed_vectors else ([], {})
    return saved, full, *config_of(plan, done.results, options, saved, base)


@contextlib.contextmanager
def kept_for_resume(journal: Journal) -> Iterator[None]:
    """The journal outlives a run that was interrupted (^C, a kill, a lost cluster, a full disk): the writer then
    keeps OUT's temporary for --resume. It is emptied when the inputs are at fault (a NaN, a mismatch, nothing
    changed), which a resumed run would meet again."""
    try:
        yield
    except (InputError, MismatchError, NumericError, UnsupportedError):
        journal.clear()
        raise


@dataclass(frozen=True)
class ExtractSummary:
    """What an extraction did (or, with dry_run, would write): per matrix and in total."""

    base: str
    tuned: str
    output: str
    dry_run: bool
    device: str
    matrices: tuple[MatrixResult, ...]
    unchanged: tuple[str, ...]  # targets whose ΔW is zero: not in the adapter
    saved_modules: tuple[str, ...]  # modules_to_save (save_changed_vectors)
    changed_other: tuple[ChangedTensor, ...]
    warnings: tuple[Finding, ...]
    curve: tuple[int, ...]
    config: dict[str, Any]
    folded: tuple[str, ...]  # modules whose factors carry lora_alpha / rᵢ ≠ 1 (the single-alpha form)
    bytes_written: int
    seconds: float
    work: WorkReport | None = None  # where the matrices were computed (local or per Ray node), retried, resumed
    resumed_from: str | None = None  # the interrupted run's temporary this run took its journal from

    @property
    def total_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all extracted matrices together."""
        return _pooled([m.error for m in self.matrices], self.matrices)

    @property
    def curve_errors(self) -> tuple[float, ...]:
        return tuple(_pooled([m.curve[i] for m in self.matrices], self.matrices) for i in range(len(self.curve)))

    @property
    def adapter_params(self) -> int:
        return sum(m.adapter_params for m in self.matrices)

    @property
    def replaced_params(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.matrices)


def _pooled(errors: list[float], matrices: tuple[MatrixResult, ...]) -> float:
    total = sum(m.norm**2 for m in matrices)
    return (sum((e * m.norm) ** 2 for e, m in zip(errors, matrices, strict=True)) / total) ** 0.5 if total else 0.0
