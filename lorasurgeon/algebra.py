"""`resize` and `combine`: adapter algebra on files, one module at a time, exact and without the dense ΔW.

Flow: load the adapters (headers) → `plan_combination` (one Job per module of OUT; everything it refuses is refused
before a factor is read) → per job, that module's factors read from each adapter in turn (one module resident),
its result computed at scale 1 with its table row → OUT written atomically through formats.computed, in the
single-alpha form. By method:

- resize, `svd`: the exact weighted sum Σ cᵢ·Bᵢ·Aᵢ stacked (stacked_sum.StackedSum; no cross terms, any weights
  and ranks), its SVD through QR and a small core, truncated by the rank rule: the Eckart–Young optimum of that
  sum's own ΔW, its error read off the spectrum;
- `cat`: the stack itself, rank Σ rᵢ, exact (PEFT's add_weighted_adapter combination_type="cat");
- `ties`, `dare`, `dare_ties`, `magnitude_prune`: defined entry by entry, so each adapter's dense ΔWᵢ of this one
  module is formed (dense_merge), merged, and factorised by a dense SVD, before the next module.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lorasurgeon.adapter import Adapter, AdapterFormat
from lorasurgeon.algebra_options import AlgebraOptions, combine_options, combine_weights, resize_options
from lorasurgeon.algebra_steps import algebra_tasks, execution_of, refuse, run_modules
from lorasurgeon.algebra_task import ModuleOutcome, Rank
from lorasurgeon.budget import allocate_budget
from lorasurgeon.cluster import WorkReport
from lorasurgeon.combination import DENSE_METHODS, Combination, Job, Method, plan_combination
from lorasurgeon.combined_module import ModuleResult, read_factors
from lorasurgeon.devices import resolve_device
from lorasurgeon.errors import Finding, LorasurgeonError, Option, UnsupportedError
from lorasurgeon.extract_steps import Execution
from lorasurgeon.extraction import JOURNAL, kept_for_resume
from lorasurgeon.factored import spectrum
from lorasurgeon.formats import computed, load_adapter
from lorasurgeon.header import torch_dtype
from lorasurgeon.hub import display_name
from lorasurgeon.journal import Journal
from lorasurgeon.spectrum_rules import SpectrumRule
from lorasurgeon.writer import CheckpointWriter

Operation = Literal["resize", "combine"]
PathLike = str | Path


@dataclass(frozen=True)
class AlgebraSummary:
    """What resize or combine wrote."""

    operation: Operation
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    method: Method
    rule: str
    source_format: AdapterFormat
    target_format: AdapterFormat
    output: str
    device: str
    modules: tuple[ModuleResult, ...]
    full: tuple[str, ...]  # keys of full tensors OUT holds (carried, or their weighted mean)
    warnings: tuple[Finding, ...]
    config: dict[str, Any] | None
    bytes_written: int
    seconds: float
    work: WorkReport | None = None  # where the modules were computed (here or per Ray node), retried, resumed
    resumed_from: str | None = None  # the interrupted run's temporary this run took its journal from

    @property
    def total_error(self) -> float:
        """‖ΔW − ΔW′‖_F / ‖ΔW‖_F over all modules together (0 for cat, which is exact)."""
        rows = [m for m in self.modules if m.norm == m.norm]  # cat rows (norm nan) are exact
        total = sum(m.norm**2 for m in rows)
        return (sum((m.row.error * m.norm) ** 2 for m in rows) / total) ** 0.5 if total else 0.0

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)


def run(
    operation: Operation,
    inputs: Sequence[str | Path],
    weights: Sequence[float],
    out: str | Path | None,
    options: AlgebraOptions,
    device: torch.device,
    force: bool,
    execution: Execution | None = None,
) -> AlgebraSummary:
    """Load, plan, compute module by module, write; for lorasurgeon.resize() and combine(). Nothing is written
    unless every module computes. One task per module (algebra_steps), here or on `execution`'s cluster, each kept
    as it is computed in a journal inside a PEFT OUT's temporary, which `resume` continues from."""
    started = time.perf_counter()
    execution = execution or Execution()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise LorasurgeonError(f"there is no adapter to {operation}: give at least one ADAPTER (an empty client list?)")
    adapters: list[Adapter] = []
    try:
        for path in paths:
            adapters.append(load_adapter(Path(path)))
        to = options.to or adapters[0].format
        plan = plan_combination(adapters, weights, to)
        refuse(options, to, execution)
        tasks = algebra_tasks(plan, len(adapters), options, _ranks(plan, adapters, options, device), device, execution)
        target = Path(out) if out is not None else default_output(adapters[0].path, to)
        writer = CheckpointWriter(
            target, is_dir=to == "peft", inputs=paths, force=force, scratch=JOURNAL, resume=execution.resume
        )
        record = {"operation": operation, "adapters": [p.name for p in paths], "method": options.method}
        with writer:
            journal = Journal(writer.path(JOURNAL)) if to == "peft" else None  # a one-file OUT keeps none
            with kept_for_resume(journal) if journal is not None else contextlib.nullcontext():
                outcomes, work = run_modules(tasks, execution, journal)
            config = _write(writer, plan, adapters, outcomes, to, record)
    finally:
        for adapter in adapters:
            adapter.source.close()
    warnings = [_left_out(plan.left_out)] if plan.left_out else []
    return AlgebraSummary(
        operation, tuple(map(str, paths)), tuple(weights), options.method, _rule_text(options), adapters[0].format, to,
        str(target), str(device), tuple(o.result for o in outcomes), tuple(f.key for f in plan.full),
        tuple(warnings), config, writer.bytes_written, time.perf_counter() - started, work,
        str(writer.resumed_from) if writer.resumed_from else None,
    )  # fmt: skip


def _write(
    writer: CheckpointWriter, plan: Combination, adapters: Sequence[Adapter], outcomes: Sequence[ModuleOutcome],
    to: AdapterFormat, record: dict[str, Any],
) -> dict[str, Any] | None:  # fmt: skip
    """OUT's tensors, config and metadata, in the single-alpha form; returns the adapter config written."""
    modules = [
        computed.Computed(job.name, job.first, o.result.row.new_rank, job.first.bias is not None)
        for job, o in zip(plan.jobs, outcomes, strict=True)
    ]
    layout = computed.layout(adapters[0], modules, to, record)
    tensors = [(*_shaped(job, o.b, o.a), o.bias) for job, o in zip(plan.jobs, outcomes, strict=True)]
    computed.write(writer, to, layout, tensors, _full(plan, adapters))
    return layout.config


def _left_out(names: tuple[str, ...]) -> Finding:
    more = f" ({len(names)} tensors in all)" if len(names) > 1 else ""
    return Finding.of("warning", f"{names[0]}: left out{more}: its module is not selected by adapter_config.json")


def default_output(adapter: Path, to: AdapterFormat) -> Path:
    """`<adapter name>-resized` in the current directory: a directory for peft, a .safetensors file otherwise."""
    stem = adapter.name.removesuffix(".safetensors") if adapter.suffix == ".safetensors" else display_name(adapter)
    return Path(f"{stem}-resized" if to == "peft" else f"{stem}-resized.safetensors")


def _rule_text(options: AlgebraOptions) -> str:
    if options.params is not None:
        return f"params {options.params}"
    return "exact" if options.rule is None else f"{options.rule.kind} {options.rule.value:g}"


def _ranks(plan: Combination, adapters: Sequence[Adapter], options: AlgebraOptions, device: torch.device) -> list[Rank]:
    """Each job's rank: a rule applied to its spectrum; --params reads every spectrum first (one more pass) and
    fixes each rank."""
    if options.method in DENSE_METHODS and any(j.first.bias is not None for j in plan.jobs):
        bias = next(j.first.bias for j in plan.jobs if j.first.bias is not None)
        raise UnsupportedError(f"{bias.name}: a lora_B bias is combined only by cat or svd (it is not a ΔW entry)")
    if options.params is not None:
        spectra = [_spectrum(job, adapters, device) for job in plan.jobs]
        costs = [job.rows + job.columns for job in plan.jobs]
        ranks = allocate_budget(spectra, costs, options.params, min_rank=1)
        return [int(k) for k in ranks]
    largest = max(t.rank for j in plan.jobs for t in j.terms)
    rule = options.rule or SpectrumRule("rank", largest)
    bound = max(min(j.rows, j.columns) if options.method in DENSE_METHODS else j.stacked_rank for j in plan.jobs)
    if rule.kind == "rank" and rule.value > bound:
        what = "rank of its modules' ΔW" if options.method in DENSE_METHODS else "stacked rank (Σ rᵢ of a module)"
        raise LorasurgeonError(
            Option("rank", int(rule.value)), f" is above the largest {what}, {bound}; resize and combine never add rank"
        )
    return [rule] * len(plan.jobs)


def _spectrum(job: Job, adapters: Sequence[Adapter], device: torch.device) -> torch.Tensor:
    (term,) = job.terms  # --params is resize's: one adapter
    b, a = read_factors(adapters, term, device)
    return spectrum(b, a, term.coefficient)


def _shaped(job: Job, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, k, *1) fp64, A (k, in, *kernel) fp32) on the CPU, in the module's own layout."""
    k = int(b.shape[1])
    b_shape, a_shape = job.first.b.shape, job.first.a.shape
    b = b.double().cpu().reshape(b_shape[0], k, *b_shape[2:])
    a = a.float().cpu().reshape(k, *a_shape[1:])
    return b, a


def _full(plan: Combination, adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """Full tensors: carried as they are (one term), or their weighted mean in fp32, rounded once to their dtype."""
    out = {}
    for full in plan.full:
        if len(full.terms) == 1:
            index, info, _ = full.terms[0]
            out[full.key] = adapters[index].source.read(info)
            continue
        total = torch.zeros(full.terms[0][1].shape, dtype=torch.float64)
        for index, info, weight in full.terms:
            total += weight * adapters[index].source.read(info).double()
        out[full.key] = total.to(torch_dtype(full.terms[0][1].dtype))
    return out


def resize(
    adapter: PathLike, out: PathLike | None = None, *, rank: int | None = None, energy: float | None = None,
    ratio: float | None = None, fro: float | None = None, params: int | None = None, to: str | None = None,
    device: str = "cpu", cluster: str | None = None, threads: int | None = None, resume: bool = False,
    force: bool = False,
) -> AlgebraSummary:  # fmt: skip
    """Write `adapter` (PEFT, kohya or diffusers) with smaller ranks, in its format or `to` (default OUT
    `<adapter>-resized` in the current directory): per module the best rank-k factors of its own ΔW (Eckart–Young),
    exactly, from its factors (never the dense ΔW). k by exactly one rule (spectrum_rules, budget): `rank`;
    `energy` F, the smallest k keeping F of ‖ΔW‖²_F; `ratio` X, σ_k/σ₁ ≥ 1/X; `fro` F, √ of the kept energy ≥ F;
    or `params` N, one budget for all modules minimising the total squared error. `cluster`, `threads` and
    `resume` run one task per module as combine's do (`params` is refused with a cluster). Raises
    UnsupportedError naming a module it cannot resize exactly (LyCORIS, DoRA), LorasurgeonError for a rank above
    every module's, OutputError when `out` cannot be written.

    >>> resize("adapter/", "small/", rank=4).modules[0].row.new_rank  # doctest: +SKIP
    4
    """
    options = resize_options({"rank": rank, "energy": energy, "ratio": ratio, "fro": fro, "params": params}, to)
    execution = execution_of(cluster, threads, resume)
    return run("resize", [adapter], [1.0], out, options, resolve_device(device), force, execution)


def combine(
    adapters: Sequence[PathLike], out: PathLike, *, weights: Sequence[float] | None = None,
    weights_file: PathLike | None = None, mean: bool = False, method: str | None = None, rank: int | None = None,
    energy: float | None = None, density: float | None = None, seed: int = 0, report_naive: bool = False,
    to: str | None = None, device: str = "cpu", cluster: str | None = None, threads: int | None = None,
    resume: bool = False, force: bool = False,
) -> AlgebraSummary:  # fmt: skip
    """Write Σ weightᵢ·ΔWᵢ of the adapters as one adapter over the union of their modules (a module missing from
    an adapter contributes 0). Weights: `weights` (one per adapter) or `weights_file` (JSON or CSV of path →
    weight, e.g. sample counts), default 1; `mean` divides them by their sum (FedAvg). `method`: cat (exact, rank
    Σ rᵢ; the default), svd (the exact sum re-compressed to `rank` or `energy`; the default when either is given),
    or ties, dare, dare_ties, magnitude_prune at `density` (on each module's dense ΔWᵢ; DARE's masks from `seed`).
    `report_naive` adds FedIT's error (A and B averaged apart) per module. `cluster` ("ray" or "ray:ADDRESS") runs
    one Ray task per module, reading the adapters from a path every node sees; `threads` is the torch threads per
    module (the factors are bit-identical for the same threads and device type, here or on any worker); `resume`
    continues an interrupted run from the modules it computed (checked against the files' sizes and mtimes).
    Raises MismatchError for adapters of different bases, LorasurgeonError for weights that do not match them,
    UnsupportedError naming what has no defined sum.

    >>> combine(["c1/", "c2/"], "global/", weights=[120, 80], mean=True, rank=16).total_error  # doctest: +SKIP
    0.012
    """
    options = combine_options(method, {"rank": rank, "energy": energy}, density, seed, report_naive, to)
    chosen = combine_weights(adapters, weights, weights_file, mean)
    execution = execution_of(cluster, threads, resume)
    return run("combine", adapters, chosen, out, options, resolve_device(device), force, execution)
