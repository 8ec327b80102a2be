"""One module of a resize or combine as a self-contained task: plain data in, that module's small result out.

An `AlgebraTask` is the module's `Job` (each term's factor tensors by absolute path and byte range, with its weight
and scale), the stamp (size, mtime) each adapter file had when the driver planned, the method, the rank (a rule
applied to the module's spectrum, or a rank fixed beforehand), the dense methods' density and seed, the device and
the torch threads: no open files. `run_algebra_task` computes it with combined_module.compute, the very function
the local run calls, reading the factors by path (refusing a file that is not the one planned from), so the factors
are bit-identical wherever it runs (DARE's masks are seeded by module and adapter index, not by process).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorasurgeon.combination import Job, Method
from lorasurgeon.combined_module import Keep, ModuleResult, compute
from lorasurgeon.devices import torch_threads
from lorasurgeon.factored import ModuleRow
from lorasurgeon.header import TensorInfo
from lorasurgeon.matrix_task import Stamp, read_tensor, tensor_place
from lorasurgeon.spectrum_rules import SpectrumRule, choose_rank

Rank = SpectrumRule | int  # a rule applied to each module's spectrum, or one module's rank fixed beforehand


def keep_of(rank: Rank) -> Keep:
    """The rank to keep as a function of the module's spectrum."""
    if isinstance(rank, int):
        return lambda sigma: rank
    return lambda sigma: choose_rank(sigma, rank, min_rank=1)


@dataclass(frozen=True)
class AlgebraTask:
    """Everything one module of OUT needs, picklable and free of open files."""

    job: Job  # its terms' tensors at absolute paths (a worker's cwd is not the driver's)
    adapters: int  # how many adapters the run combines (DARE's masks and FedIT's mean depend on it)
    method: Method
    rank: Rank
    density: float
    seed: int
    report_naive: bool
    stamps: tuple[tuple[Path, Stamp], ...]  # of every file the job reads, when planned
    device: str  # a torch device: "cpu", or "cuda" (on a Ray worker, the GPU Ray gave it)
    threads: int  # torch intra-op threads (results depend on them)

    def key(self) -> str:
        """What the result depends on, hashed: each term's tensors, places, weight and scale, the files' stamps,
        the method and rank, the settings, the device type, the threads and the torch version."""
        terms = [
            [t.adapter, t.weight, t.module.scale, t.module.kind, [tensor_place(i) for i in t.module.tensors]]
            for t in self.job.terms
        ]
        rank = self.rank if isinstance(self.rank, int) else asdict(self.rank)
        fields = [self.job.name, self.job.rows, self.job.columns, terms, self.adapters, self.method, rank]
        fields += [self.density, self.seed, self.report_naive, [[str(p), list(s)] for p, s in self.stamps]]
        fields += [torch.device(self.device).type, self.threads, torch.__version__]
        return hashlib.blake2b(json.dumps(fields, default=str).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ModuleOutcome:
    """A task's result: the row, B (m, k) and A (k, n) at scale 1 on the CPU, and the summed lora_B bias."""

    result: ModuleResult
    b: torch.Tensor
    a: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class StampedFiles:
    """Tensors read by path and byte range from the files the driver planned from (matrix_task.read_tensor)."""

    stamps: dict[Path, Stamp]

    def read(self, info: TensorInfo) -> torch.Tensor:
        return read_tensor(info, self.stamps[info.path])


@dataclass(frozen=True)
class _Held:
    """What combined_module.compute reads an adapter's tensors through (an Adapter's `source`)."""

    source: StampedFiles


def run_algebra_task(task: AlgebraTask) -> ModuleOutcome:
    """Compute the module as the local run does (combined_module.compute), its factors read by path."""
    held = [_Held(StampedFiles(dict(task.stamps)))] * task.adapters
    device = torch.device(task.device)
    with torch_threads(task.threads):
        result, factors, bias = compute(
            task.job, held, task.method, keep_of(task.rank), device, task.density, task.seed, task.report_naive
        )
    return ModuleOutcome(result, factors.b.cpu(), factors.a.cpu(), bias)


def outcome_entry(outcome: ModuleOutcome) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, record) to keep an outcome in the journal; `outcome_of` reads it back exactly."""
    tensors = {"b": outcome.b, "a": outcome.a}
    if outcome.bias is not None:
        tensors["bias"] = outcome.bias
    r = outcome.result
    return tensors, {"row": asdict(r.row), "norm": r.norm, "naive": r.naive, "params": r.params}


def outcome_of(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> ModuleOutcome:
    result = ModuleResult(ModuleRow(**record["row"]), record["norm"], record["naive"], record["params"])
    return ModuleOutcome(result, tensors["b"], tensors["a"], tensors.get("bias"))
