"""One module of OUT computed from its terms at scale 1, with its row of the table; the per-module step of
resize and combine (lorasurgeon.algebra), reading that module's factors from each adapter in turn.

- resize, `svd`: Σ cᵢ·Bᵢ·Aᵢ streamed into a StackedSum, truncated by the rank rule through its QR core;
- `cat`: the stack [c₁B₁ … c_nB_n], [A₁; …; A_n] itself (factored.stack), exact at rank Σ rᵢ;
- dense methods: each adapter's dense ΔWᵢ of this module, merged by dense_merge, then a dense SVD.
With `report_naive`, also FedIT's error: its B̄ = Σ wᵢsᵢBᵢ and Ā = Σ (wᵢ/Σw)·Aᵢ give (Σw)·s·B̄·Ā, compared with the
exact sum where every adapter has the module at one rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lorasurgeon import dense_merge
from lorasurgeon.combination import DENSE_METHODS, Job, Method, Term
from lorasurgeon.factored import Factored, ModuleRow, module_row, stack, truncate
from lorasurgeon.header import TensorInfo
from lorasurgeon.stacked_sum import StackedSum, naive_relative_error

Keep = Callable[[torch.Tensor], int]
DENSE: dict[str, dense_merge.Method] = {m: m for m in ("ties", "dare", "dare_ties", "magnitude_prune")}


class Reads(Protocol):
    def read(self, info: TensorInfo) -> torch.Tensor: ...


class Sourced(Protocol):
    """What a module is computed from: an adapter's `source` (its Checkpoint here; files by path on a worker)."""

    @property
    def source(self) -> Reads: ...


@dataclass(frozen=True)
class ModuleResult:
    """One row of the table: ranks, retained energy and relative error (factored.ModuleRow), ‖ΔW‖_F (nan for
    cat, which computes no spectrum), FedIT's relative error (None: not asked, or the clients' ranks differ), and
    the parameters the module takes in OUT."""

    row: ModuleRow
    norm: float
    naive: float | None
    params: int


def compute(
    job: Job,
    adapters: Sequence[Sourced],
    method: Method,
    keep: Keep,
    device: torch.device,
    density: float = 1.0,
    seed: int = 0,
    report_naive: bool = False,
) -> tuple[ModuleResult, Factored, torch.Tensor | None]:
    """One module of OUT at scale 1: its result (row), its factors (B (m, k), A (k, n)), its summed lora_B bias."""
    bias = _bias(job, adapters) if job.first.bias is not None else None
    naive = None
    if method in DENSE_METHODS:
        factors = _dense(job, adapters, DENSE[method], (density, seed), keep, device)
    elif method == "cat":
        factors, naive = _cat(job, adapters, report_naive, device)
    else:
        factors, naive = _exact(job, adapters, report_naive, keep, device)
    k = int(factors.b.shape[1])
    if method == "cat":
        row, norm = ModuleRow(job.name, job.stacked_rank, k, 1.0, 0.0), float("nan")
    else:
        row = module_row(job.name, job.stacked_rank, factors.sigma, k)
        norm = float(factors.sigma.double().square().sum().sqrt())
    return ModuleResult(row, norm, naive, k * (job.rows + job.columns)), factors, bias


def read_factors(adapters: Sequence[Sourced], term: Term, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m, r) and A (r, n) of one term's module, conv kernels flattened, in their stored dtype, on `device`."""
    source = adapters[term.adapter].source
    b, a = source.read(term.module.b).to(device), source.read(term.module.a).to(device)
    return b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1)


def _naive_terms(job: Job, adapters: Sequence[Sourced]) -> bool:
    """FedIT averages A and B of one rank: defined when every adapter has the module at one rank."""
    return len(job.terms) == len(adapters) and len({t.rank for t in job.terms}) == 1


def _exact(
    job: Job, adapters: Sequence[Sourced], report_naive: bool, keep: Keep, device: torch.device
) -> tuple[Factored, float | None]:
    naive = report_naive and _naive_terms(job, adapters)
    rank = job.terms[0].rank
    total = StackedSum(job.rows, job.columns, capacity=job.stacked_rank + (rank if naive else 0), device=device)
    b_mean = torch.zeros(job.rows, rank, dtype=torch.float64, device=device) if naive else None
    a_mean = torch.zeros(rank, job.columns, dtype=torch.float64, device=device) if naive else None
    weight = sum(t.weight for t in job.terms)
    for term in job.terms:  # one client's factors in memory beyond the sum
        b, a = read_factors(adapters, term, device)
        total.add(b, a, term.coefficient)
        if b_mean is not None and a_mean is not None:
            b_mean += term.coefficient * b.double()  # B̄ = Σ wᵢsᵢBᵢ, Ā = Σ (wᵢ/Σw)·Aᵢ: FedIT's (Σw)·s·B̄·Ā
            a_mean += (term.weight / weight if weight else 0.0) * a.double()
        del b, a
    pair = (b_mean, a_mean) if b_mean is not None and a_mean is not None and weight else None
    factors, error = total.truncated(keep, naive=pair)
    return factors, error if pair is not None else None


def _cat(
    job: Job, adapters: Sequence[Sourced], report_naive: bool, device: torch.device
) -> tuple[Factored, float | None]:
    terms = [(*read_factors(adapters, t, device), t.coefficient) for t in job.terms]
    b, a = stack(terms)  # (m, Σr), (Σr, n): B* = [c₁B₁ … c_nB_n], A* = [A₁; …; A_n]
    weight = sum(t.weight for t in job.terms)
    naive = None
    if report_naive and _naive_terms(job, adapters) and weight:
        total = StackedSum(job.rows, job.columns, capacity=int(b.shape[1]), device=device)
        total.add(b, a, 1.0)
        b_mean = torch.stack([c * bi.double() for bi, _, c in terms]).sum(0)
        shares = [t.weight / weight for t in job.terms]
        a_mean = torch.stack([p * ai.double() for (_, ai, _), p in zip(terms, shares, strict=True)]).sum(0)
        naive = naive_relative_error(total, b_mean, a_mean)
    return Factored(b, a, torch.zeros(0, dtype=torch.float64)), naive


def _dense(
    job: Job,
    adapters: Sequence[Sourced],
    method: dense_merge.Method,
    settings: tuple[float, int],
    keep: Keep,
    device: torch.device,
) -> Factored:
    """TIES / DARE / magnitude pruning on this module's dense ΔWᵢ = sᵢ·Bᵢ·Aᵢ (zeros where an adapter lacks it, so
    that DARE's masks stay those of (seed, module, adapter index)), then the dense SVD of the result."""
    deltas = [torch.zeros(job.rows, job.columns, device=device) for _ in adapters]
    for term in job.terms:
        b, a = read_factors(adapters, term, device)
        deltas[term.adapter] = term.module.scale * (b.float() @ a.float())  # (m, r) @ (r, n), fp32
    weights = [next((t.weight for t in job.terms if t.adapter == i), 0.0) for i in range(len(adapters))]
    density, seed = settings
    merged = dense_merge.merge_dense(method, deltas, weights, density, seed, job.name)
    del deltas
    u, sigma, vh = torch.linalg.svd(merged.double(), full_matrices=False)
    return truncate(u, sigma, vh, keep(sigma))


def _bias(job: Job, adapters: Sequence[Sourced]) -> torch.Tensor:
    """Σ cᵢ·biasᵢ of the lora_B biases (PEFT scales lora_B's bias with lora_B), fp64, at scale 1."""
    total = torch.zeros(job.rows, dtype=torch.float64)
    for term in job.terms:
        if term.module.bias is not None:
            total += term.coefficient * adapters[term.adapter].source.read(term.module.bias).double()
    return total
