"""One target matrix of an extract as a self-contained task: plain data in, the small factors out.

A `MatrixTask` names its two tensors by path and byte range, with the size and mtime each file had when the
driver planned (a worker that sees another file at that path refuses instead of computing from it), the rank
rule, the device and the torch threads. `run_matrix_task` reads them, forms ΔW in fp32 and decomposes it. The
local run and every Ray worker run this same function on the same data, so the factors are bit-identical:
each matrix's random sketch has its own seed, derived from the rule's seed and the tensor's name, whichever
process runs it; and the thread count is part of the task, because MKL's results depend on it (a product of
the same matrices differs in the last bits between 1 and 2 threads).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lorasurgeon.decomposition import MatrixResult, decompose
from lorasurgeon.devices import torch_threads
from lorasurgeon.errors import InputError, NumericError
from lorasurgeon.header import TensorInfo, read_into, torch_dtype
from lorasurgeon.rank_rule import RankRule

Stamp = tuple[int, int]  # (size, mtime_ns) of a file


@dataclass(frozen=True)
class MatrixTask:
    """Everything one matrix's extraction needs, picklable and free of open files."""

    module: str
    kind: str  # "linear" | "embedding"
    transpose: bool  # stored (in, out): decompose ΔWᵀ
    base: TensorInfo
    tuned: TensorInfo
    stamps: tuple[Stamp, Stamp]  # of base.path and tuned.path, when planned
    rule: RankRule
    device: str  # a torch device: "cpu", or "cuda" (on a Ray worker, the GPU Ray gave it)
    threads: int  # torch intra-op threads

    @property
    def seed(self) -> int:
        return matrix_seed(self.rule.seed, self.tuned.name)

    def key(self) -> str:
        """What the result depends on, hashed: the tensors' names, places and files' stamps, the rule, the device
        type, the threads and the torch version. A journal entry under another key is never used for it."""
        device = torch.device(self.device).type
        fields = (
            self.module,
            self.kind,
            self.transpose,
            tensor_place(self.base),
            tensor_place(self.tuned),
            self.stamps,
        )
        text = json.dumps([*fields, asdict(self.rule), device, self.threads, torch.__version__], default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class MatrixOutcome:
    """A task's result: None and no factors when ΔW is zero; else B (out, r) and A (r, in), fp32 on the CPU."""

    result: MatrixResult | None
    b: torch.Tensor | None = None
    a: torch.Tensor | None = None


def matrix_seed(seed: int, name: str) -> int:
    """The seed of one matrix's random sketch: a hash of (seed, tensor name), the same in every process."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: manual_seed takes it on every device


def file_stamp(path: os.PathLike[str] | str) -> Stamp:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def run_matrix_task(task: MatrixTask) -> MatrixOutcome:
    """Read the pair, form ΔW = tuned − base in fp32 on the task's device, and decompose it (see module doc)."""
    device = torch.device(task.device)
    with torch_threads(task.threads):
        delta = read_tensor(task.tuned, task.stamps[1]).to(device=device, dtype=torch.float32)
        delta -= read_tensor(task.base, task.stamps[0]).to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise NumericError(
                f"{task.tuned.path}: {task.tuned.name} − BASE holds NaN or Inf values; cannot extract it"
            )
        if task.transpose:
            delta = delta.T.contiguous()  # (in, out) -> (out, in): PEFT's A is (r, in), B is (out, r)
        if not torch.any(delta):
            return MatrixOutcome(None)
        generator = torch.Generator(device=device).manual_seed(task.seed)
        result, b, a = decompose(
            delta, task.rule, generator, module=task.module, tensor=task.tuned.name, kind=task.kind
        )
    return MatrixOutcome(result, b, a)


def read_tensor(info: TensorInfo, stamp: Stamp) -> torch.Tensor:
    """The tensor's bytes read by path and range into a fresh CPU buffer; InputError when the file is not the
    one planned from (its size or mtime differ: on a cluster, the path must be on storage every node shares)."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    try:
        fd = os.open(info.path, os.O_RDONLY)
    except OSError as e:
        raise InputError(f"{info.path}: cannot read {info.name} here: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != stamp:
            raise InputError(
                f"{info.path}: is not the file the run was planned from (size or mtime changed, or another node "
                "sees another file at this path); every node must read the same checkpoint"
            )
        read_into(info.path, fd, buffer.numpy().data, info.start)
    finally:
        os.close(fd)
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)


def outcome_entry(outcome: MatrixOutcome) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, record) to keep an outcome in the journal; `outcome_of` reads it back exactly."""
    if outcome.result is None or outcome.b is None or outcome.a is None:
        return {}, {"unchanged": True}
    return {"b": outcome.b, "a": outcome.a}, {"result": asdict(outcome.result)}


def outcome_of(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> MatrixOutcome:
    if record.get("unchanged"):
        return MatrixOutcome(None)
    fields = dict(record["result"])
    fields.update(shape=tuple(fields["shape"]), curve=tuple(fields["curve"]), spectrum=tuple(fields["spectrum"]))
    return MatrixOutcome(MatrixResult(**fields), tensors["b"], tensors["a"])


def tensor_place(info: TensorInfo) -> list[Any]:
    """A tensor's name, dtype, shape, file and byte range, as JSON: what a task's key says of where it reads."""
    return [info.name, info.dtype, list(info.shape), str(info.path), info.start, info.end]
