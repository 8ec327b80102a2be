"""Extract a LoRA adapter from a full fine-tune: per matrix ΔW = W_tuned − W_base, truncated SVD, PEFT directory.

Flow: `plan_extract` pairs the two checkpoints' tensors by name from their headers (nothing read, every
mismatch a finding); `decompose_pairs` then reads one matrix pair at a time, forms ΔW in fp32 on the device,
factorises it (lorasurgeon.decomposition) as B·A = U_r·diag(σ_r)·V_rᵀ with √σ in each factor, and keeps only the
small factors; the PEFT writer (lorasurgeon.formats.peft) publishes the adapter directory atomically.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.decomposition import MatrixResult, decompose
from lorasurgeon.errors import Finding, NothingChangedError, NumericError
from lorasurgeon.formats import peft
from lorasurgeon.formats.model_classes import auto_mapping, task_type
from lorasurgeon.formats.peft_config import adapter_config, target_modules_for
from lorasurgeon.formats.scale_form import ScaleForm, scale_form
from lorasurgeon.header import TensorInfo
from lorasurgeon.pairing import ExtractOptions, ExtractPlan, plan_extract
from lorasurgeon.surgery import Progress
from lorasurgeon.writer import CheckpointWriter


@dataclass(frozen=True)
class ChangedTensor:
    """A tensor that differs between BASE and TUNED but is not in the adapter (norms, biases, heads)."""

    name: str
    shape: tuple[int, ...]
    max_change: float


def decompose_pairs(
    plan: ExtractPlan,
    options: ExtractOptions,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[list[MatrixResult], dict[str, torch.Tensor], list[ChangedTensor]]:
    """Read one pair at a time and decompose it; returns (results, PEFT-keyed fp32 factors, other changes).

    Targets whose ΔW is zero are left out of both. Raises NothingChangedError when every target is unchanged.
    """
    generator = torch.Generator(device=device).manual_seed(options.rule.seed)
    results: list[MatrixResult] = []
    factors: dict[str, torch.Tensor] = {}
    total = len(plan.pairs) + len(plan.others)
    work = sum(p.base.nbytes + p.tuned.nbytes for p in plan.pairs)
    work += sum(b.nbytes + t.nbytes for b, t in plan.others)
    done = 0
    for index, pair in enumerate(plan.pairs):
        delta = read_delta(plan, pair.base, pair.tuned, device)
        if pair.transpose:
            delta = delta.T.contiguous()  # (in, out) -> (out, in): PEFT's A is (r, in), B is (out, r)
        if torch.any(delta):
            result, b, a = decompose(
                delta, options.rule, generator, module=pair.module, tensor=pair.tuned.name, kind=pair.kind
            )
            results.append(result)
            factors.update(peft.factor_tensors(pair.module, pair.kind, b, a))
        del delta
        done += pair.base.nbytes + pair.tuned.nbytes
        if on_progress:
            on_progress(Progress(index + 1, total, done, work))
    changed = _changed_others(plan, device, on_progress, (len(plan.pairs), total, done, work))
    if not results:
        differ = f"; only {len(changed)} other tensors differ (e.g. {changed[0].name})" if changed else ""
        raise NothingChangedError(
            f"{plan.tuned.path}: every target matrix equals BASE {plan.base.path}, so there is nothing to "
            f"extract{differ}"
        )
    return results, factors, changed


def read_delta(plan: ExtractPlan, base: TensorInfo, tuned: TensorInfo, device: torch.device) -> torch.Tensor:
    """W_tuned − W_base in fp32 on `device` (subtracted in fp32, never in the stored dtype)."""
    delta = plan.tuned.read(tuned).to(device=device, dtype=torch.float32)
    delta -= plan.base.read(base).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(delta).all()):
        raise NumericError(f"{tuned.path}: {tuned.name} − BASE holds NaN or Inf values; cannot extract it")
    return delta


def _changed_others(
    plan: ExtractPlan,
    device: torch.device,
    on_progress: Callable[[Progress], None] | None,
    counts: tuple[int, int, int, int],
) -> list[ChangedTensor]:
    index, total, done, work = counts
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
            on_progress(Progress(index, total, done, work))
    return changed


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
    return Path.cwd() / f"{(tuned.root.resolve().name if tuned.layout == 'dir' else stem)}-lora"


def run(
    base: Path,
    tuned: Path,
    out: Path | None,
    options: ExtractOptions,
    device: torch.device,
    force: bool,
    dry_run: bool,
    on_progress: Callable[[Progress], None] | None,
) -> ExtractSummary:
    """plan -> decompose -> write, for lorasurgeon.extract(); OUT is checked before any SVD is computed."""
    started = time.perf_counter()
    if base.resolve() == tuned.resolve():
        raise NothingChangedError(f"{tuned}: BASE and TUNED are the same checkpoint, so there is nothing to extract")
    with Checkpoint.open(base) as base_ckpt, Checkpoint.open(tuned) as tuned_ckpt:
        plan = plan_extract(base_ckpt, tuned_ckpt, options)
        target = out if out is not None else default_output(tuned_ckpt)
        writer = None if dry_run else CheckpointWriter(target, is_dir=True, inputs=[base, tuned], force=force)
        results, factors, changed = decompose_pairs(plan, options, device, on_progress)
        saved, full = changed_vectors(plan, changed, results) if options.save_changed_vectors else ([], {})
        config, form, stated = config_of(plan, results, options, saved, str(base))
        if writer is not None:
            record = {"operation": "extract", "base": base_ckpt.path.name, "tuned": tuned_ckpt.path.name}
            with writer:
                peft.write_adapter(writer, factors, config, record, full, multipliers(results, form, stated))
        extracted = {r.module for r in results}
        return ExtractSummary(
            base=str(base),
            tuned=str(tuned),
            output=str(target),
            dry_run=dry_run,
            device=str(device),
            matrices=tuple(results),
            unchanged=tuple(p.tuned.name for p in plan.pairs if p.module not in extracted),
            saved_modules=tuple(saved),
            changed_other=tuple(changed),
            warnings=plan.findings,
            curve=options.rule.curve,
            config=config,
            folded=form.folded,
            bytes_written=writer.bytes_written if writer is not None else 0,
            seconds=time.perf_counter() - started,
        )


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
