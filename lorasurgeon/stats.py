"""The data pass of `report --stats`: every tensor read once for its statistics (NaN/Inf, min/max/mean/std), then
each module's ΔW norms from its factors (r×r Gram matrices; per expert for LoRA on fused MoE experts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lorasurgeon import lycoris
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.progress import Progress
from lorasurgeon.report import ROLE_NAMES, ModuleReport, Report, TensorStats


def with_stats(report: Report, ckpt: Checkpoint, on_progress: Callable[[Progress], None] | None) -> Report:
    """One pass over the tensor data, one tensor at a time: per-tensor statistics, then per-module ΔW norms."""
    from lorasurgeon import linalg

    infos = list(ckpt)
    total = sum(t.nbytes for t in infos)
    stats, done = [], 0
    for i, info in enumerate(infos, 1):
        stats.append(TensorStats(info.name, info.dtype, *linalg.tensor_stats(ckpt.read(info))))
        done += info.nbytes
        if on_progress:
            on_progress(Progress(i, len(infos), done, total, "reading"))
    modules = tuple(delta_norms(ckpt, m) for m in report.modules)
    return replace(report, stats=tuple(stats), modules=modules)


def delta_norms(ckpt: Checkpoint, m: ModuleReport) -> ModuleReport:
    from lorasurgeon import experts, linalg

    if m.rank is None or m.base_shape is None:
        return m
    if m.kind in lycoris.ALGORITHMS:
        renamed = {v: k for k, v in ROLE_NAMES.items()}
        factors = {renamed.get(r, r): ckpt.read(ckpt.tensors[k]) for r, k in m.tensors.items()}
        factors.pop("dora_scale", None)
        if any(linalg.nonfinite_count(f) for f in factors.values()):
            return m
        fro, spectral, stable = lycoris.delta_norms(lycoris.delta(m.kind, factors, 1.0, m.base_shape))
    elif m.experts:  # per expert: ‖ΔW‖_F² adds up over experts, the spectral norm is the largest expert's
        a, b = (ckpt.read(ckpt.tensors[m.tensors[f"lora_{r}"]]) for r in "AB")
        if linalg.nonfinite_count(a) or linalg.nonfinite_count(b):
            return m
        norms = [
            linalg.lora_delta_norms(*reversed(experts.expert_factors(a, b, m.experts, e))) for e in range(m.experts)
        ]
        fro, spectral = sum(n[0] ** 2 for n in norms) ** 0.5, max(n[1] for n in norms)
        stable = None  # one stable rank per expert would be the figure; a single number would mislead
    else:
        prefix = "lora_embedding_" if m.kind == "embedding" else "lora_"
        a_info, b_info = ckpt.tensors[m.tensors[prefix + "A"]], ckpt.tensors[m.tensors[prefix + "B"]]
        if a_info.shape[0] != b_info.shape[1]:  # ranks that disagree give no product (check says so)
            return m
        a, b = ckpt.read(a_info), ckpt.read(b_info)
        if linalg.nonfinite_count(a) or linalg.nonfinite_count(b):
            return m  # the NaN/Inf are counted in the tensor statistics; a norm of them means nothing
        fro, spectral, stable = linalg.lora_delta_norms(a, b)
    scale = abs(m.scale) if m.scale is not None else None
    return replace(
        m,
        delta_norm=None if scale is None else scale * fro,
        delta_spectral_norm=None if scale is None else scale * spectral,
        stable_rank=stable,
    )
