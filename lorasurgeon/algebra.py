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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter, AdapterFormat
from lorasurgeon.budget import allocate_budget
from lorasurgeon.client_weights import read_weights
from lorasurgeon.combination import DENSE_METHODS, METHODS, Combination, Job, Method, plan_combination
from lorasurgeon.combined_module import Keep, ModuleResult, compute, read_factors
from lorasurgeon.dense_merge import check_density
from lorasurgeon.errors import Finding, LorasurgeonError, Option, UnsupportedError
from lorasurgeon.factored import Factored, spectrum
from lorasurgeon.formats import computed, load_adapter
from lorasurgeon.header import torch_dtype
from lorasurgeon.rank_rules import RankRule, choose_rank
from lorasurgeon.writer import CheckpointWriter

Operation = Literal["resize", "combine"]


@dataclass(frozen=True)
class AlgebraOptions:
    """How to combine: `method`; the rank `rule` (None: cat, or the largest input rank) or one `params` budget
    (resize); `density` and `seed` for the dense methods; `report_naive` FedIT's error per module; OUT's format
    `to` (None: the first adapter's)."""

    method: Method = "svd"
    rule: RankRule | None = None
    params: int | None = None
    density: float | None = None
    seed: int = 0
    report_naive: bool = False
    to: AdapterFormat | None = None


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
) -> AlgebraSummary:
    """Load, plan, compute module by module, write; for lorasurgeon.resize() and combine(). Nothing is written
    unless every module computes."""
    started = time.perf_counter()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise LorasurgeonError(f"there is no adapter to {operation}: give at least one ADAPTER (an empty client list?)")
    adapters: list[Adapter] = []
    try:
        for path in paths:
            adapters.append(load_adapter(Path(path)))
        to = options.to or adapters[0].format
        plan = plan_combination(adapters, weights, to)
        keeps = _keeps(plan, adapters, options, device)
        target = Path(out) if out is not None else default_output(adapters[0].path, to)
        writer = CheckpointWriter(target, is_dir=to == "peft", inputs=paths, force=force)
        settings = (options.density if options.density is not None else 1.0, options.seed, options.report_naive)
        results, tensors = [], []
        for job, keep in zip(plan.jobs, keeps, strict=True):
            result, factors, bias = compute(job, adapters, options.method, keep, device, *settings)
            results.append(result)
            tensors.append((*_shaped(job, factors), bias))
        modules = [
            computed.Computed(job.name, job.first, result.row.new_rank, job.first.bias is not None)
            for job, result in zip(plan.jobs, results, strict=True)
        ]
        record = {"operation": operation, "adapters": [p.name for p in paths], "method": options.method}
        layout = computed.layout(adapters[0], modules, to, record)
        with writer:
            computed.write(writer, to, layout, tensors, _full(plan, adapters))
    finally:
        for adapter in adapters:
            adapter.source.close()
    warnings = [_left_out(plan.left_out)] if plan.left_out else []
    return AlgebraSummary(
        operation, tuple(map(str, paths)), tuple(weights), options.method, _rule_text(options), adapters[0].format, to,
        str(target), str(device), tuple(results), tuple(f.key for f in plan.full), tuple(warnings), layout.config,
        writer.bytes_written, time.perf_counter() - started,
    )  # fmt: skip


def _left_out(names: tuple[str, ...]) -> Finding:
    more = f" ({len(names)} tensors in all)" if len(names) > 1 else ""
    return Finding.of("warning", f"{names[0]}: left out{more}: its module is not selected by adapter_config.json")


def default_output(adapter: Path, to: AdapterFormat) -> Path:
    """`<adapter name>-resized` in the current directory: a directory for peft, a .safetensors file otherwise."""
    stem = adapter.name.removesuffix(".safetensors")
    return Path(f"{stem}-resized" if to == "peft" else f"{stem}-resized.safetensors")


def _rule_text(options: AlgebraOptions) -> str:
    if options.params is not None:
        return f"params {options.params}"
    return "exact" if options.rule is None else f"{options.rule.kind} {options.rule.value:g}"


def _keeps(plan: Combination, adapters: Sequence[Adapter], options: AlgebraOptions, device: torch.device) -> list[Keep]:
    """Each job's rank as a function of its spectrum; --params reads every spectrum first (one more pass)."""
    if options.method in DENSE_METHODS and any(j.first.bias is not None for j in plan.jobs):
        bias = next(j.first.bias for j in plan.jobs if j.first.bias is not None)
        raise UnsupportedError(f"{bias.name}: a lora_B bias is combined only by cat or svd (it is not a ΔW entry)")
    if options.params is not None:
        spectra = [_spectrum(job, adapters, device) for job in plan.jobs]
        costs = [job.rows + job.columns for job in plan.jobs]
        ranks = allocate_budget(spectra, costs, options.params, min_rank=1)
        return [_fixed(k) for k in ranks]
    largest = max(t.rank for j in plan.jobs for t in j.terms)
    rule = options.rule or RankRule("rank", largest)
    bound = max(min(j.rows, j.columns) if options.method in DENSE_METHODS else j.stacked_rank for j in plan.jobs)
    if rule.kind == "rank" and rule.value > bound:
        what = "rank of its modules' ΔW" if options.method in DENSE_METHODS else "stacked rank (Σ rᵢ of a module)"
        raise LorasurgeonError(
            Option("rank", int(rule.value)), f" is above the largest {what}, {bound}; resize and combine never add rank"
        )
    return [lambda sigma: choose_rank(sigma, rule, min_rank=1)] * len(plan.jobs)


def _fixed(k: int) -> Keep:
    return lambda sigma: k


def _spectrum(job: Job, adapters: Sequence[Adapter], device: torch.device) -> torch.Tensor:
    (term,) = job.terms  # --params is resize's: one adapter
    b, a = read_factors(adapters, term, device)
    return spectrum(b, a, term.coefficient)


def _shaped(job: Job, factors: Factored) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (m, k, *1) fp64, A (k, in, *kernel) fp32) on the CPU, in the module's own layout."""
    k = int(factors.b.shape[1])
    b_shape, a_shape = job.first.b.shape, job.first.a.shape
    b = factors.b.double().cpu().reshape(b_shape[0], k, *b_shape[2:])
    a = factors.a.float().cpu().reshape(k, *a_shape[1:])
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


def resize_options(rules: dict[str, float | None], to: str | None) -> AlgebraOptions:
    """AlgebraOptions of `resize` from its rank rules (exactly one of rank, energy, ratio, fro, params given)."""
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) != 1:
        metavars = {"rank": "R", "energy": "F", "ratio": "X", "fro": "F", "params": "N"}
        parts: list[str | Option] = ["resize needs exactly one of "]
        for i, name in enumerate(rules):
            parts += [Option(name, metavar=metavars.get(name, "…")), ", " if i < len(rules) - 1 else ""]
        raise LorasurgeonError(*parts, f" (given: {', '.join(given) or 'none'})")
    (name, value), target = next(iter(given.items())), _target(to)
    if name == "params":
        if value != int(value) or value < 1:
            raise LorasurgeonError(Option("params", value), ": must be a whole number of parameters, at least 1")
        return AlgebraOptions(params=int(value), to=target)
    return AlgebraOptions(rule=RankRule(name, value), to=target)  # type: ignore[arg-type]


def combine_options(
    method: str | None,
    rules: dict[str, float | None],
    density: float | None,
    seed: int,
    report_naive: bool,
    to: str | None,
) -> AlgebraOptions:
    """AlgebraOptions of `combine`: the method defaults to svd when a rank rule is given, else cat."""
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) > 1:
        raise LorasurgeonError(Option("rank", metavar="R"), " and ", Option("energy", metavar="F"), " are exclusive")
    chosen = method or ("svd" if given else "cat")
    if chosen not in METHODS:
        raise LorasurgeonError(Option("method", chosen), f": expected one of {', '.join(METHODS)}")
    if chosen == "cat" and given:
        raise LorasurgeonError(
            Option("method", "cat"), " keeps every term at rank Σ rᵢ; re-compress with ", Option("method", "svd")
        )
    dense = chosen in DENSE_METHODS
    if dense != (density is not None):
        needs = "needs" if dense else "is only for ties, dare, dare_ties and magnitude_prune, not"
        raise LorasurgeonError(Option("density", metavar="D"), f" {needs} ", Option("method", chosen))
    if report_naive and dense:
        raise LorasurgeonError(Option("report_naive", flag=True), " compares FedIT with the exact sum of cat or svd")
    if density is not None:
        check_density(density)
    rule = RankRule(*next(iter(given.items()))) if given else None  # type: ignore[arg-type]
    return AlgebraOptions(next(m for m in METHODS if m == chosen), rule, None, density, seed, report_naive, _target(to))


def combine_weights(
    inputs: Sequence[str | Path], weights: Sequence[float] | None, weights_file: str | Path | None, mean: bool
) -> list[float]:
    """Each adapter's weight: `weights` (one per adapter), `weights_file` (client_weights), or 1; with `mean`
    divided by their sum (FedAvg)."""
    if weights and weights_file is not None:
        raise LorasurgeonError(
            Option("weights", cli="weight"), " and ", Option("weights_file", cli="weights"), " exclude each other"
        )
    paths = [Path(p) for p in inputs]
    if weights_file is not None:
        chosen = read_weights(Path(weights_file), paths)
    else:
        chosen = [float(w) for w in weights] if weights else [1.0] * len(paths)
    if mean:
        total = sum(chosen)
        if total == 0 or not math.isfinite(total):
            raise LorasurgeonError(Option("mean", flag=True), f": the weights sum to {total}, so they have no mean")
        chosen = [w / total for w in chosen]
    return chosen


def _target(to: str | None) -> AdapterFormat | None:
    if to is None:
        return None
    if to not in ADAPTER_FORMATS:
        raise LorasurgeonError(Option("to", to), f": expected one of {', '.join(ADAPTER_FORMATS)}")
    return next(f for f in ADAPTER_FORMATS if f == to)
