"""Running the steps of quantized weights (plan.Step.quantized): each stored part read from whichever shard holds
it, the weight merged in its own format (lorasurgeon.requant) or dequantized, and how much of ΔW the stored result
carries, per weight.

A weight's rewritten parts (an FP8 weight and its weight_scale_inv, say) are separate steps, possibly in separate
shards: the first of them computes the merge, and the other parts' new values are handed out (`take_kept`) for the
shard being written to write ahead, or kept for their steps when they are small (scales); a large one in another
shard is computed again when its turn comes, so memory stays one weight's worth.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorasurgeon import blocks, requant
from lorasurgeon.devices import torch_threads
from lorasurgeon.errors import NumericError
from lorasurgeon.fp8 import DeltaRows
from lorasurgeon.header import torch_dtype
from lorasurgeon.plan import Plan, Step
from lorasurgeon.read_ahead import Parts, read_parts
from lorasurgeon.terms import Factors, Matrices, blockwise, fused_term

KEPT_BYTES = 64 << 20  # parts kept for a later step of the same weight in another shard; larger ones are recomputed
LOST = 0.5  # a weight is flagged when its survival is below this, or its error above it


@dataclass(frozen=True)
class Requantized:
    """One quantized weight the merge rewrote: `survival` = ‖D‖ / ‖ΔW‖ and `error` = ‖D − ΔW‖ / ‖ΔW‖, where D is
    the change the stored weight carries (lorasurgeon.fp8_merge.Fp8Merge); `lost` flags one where the quantization kept
    too little of ΔW (survival below LOST, or error above it)."""

    tensor: str
    survival: float
    error: float

    @property
    def lost(self) -> bool:
        return not (self.survival >= LOST and self.error <= LOST)


class Requantizer:
    """Computes quantized steps of `plan`, reading adapter factors through `factors`; `figures` lists each
    rewritten weight once."""

    def __init__(self, plan: Plan, factors: Factors, sign: int) -> None:
        self.plan = plan
        self.factors = factors
        self.sign = sign
        self.figures: dict[str, Requantized] = {}
        self._kept: dict[str, torch.Tensor] = {}

    def compute(self, step: Step, parts: Parts | None = None) -> torch.Tensor:
        """The tensor the step writes: a rewritten part, or the dequantized float weight (`parts`: its weight's
        stored tensors when they have been read already, lorasurgeon.read_ahead). On CPU with every core
        as torch threads (a CPU merge otherwise runs one; lorasurgeon.fp8_kernel runs a band per thread):
        re-quantizing is compute-bound, where a float merge is disk-bound and shares its cores with the reader and
        writer."""
        cores = (os.cpu_count() or 1) if self.factors.device.type == "cpu" else torch.get_num_threads()
        with torch_threads(cores):
            return self._compute(step, parts)

    def _compute(self, step: Step, read: Parts | None) -> torch.Tensor:
        part = step.quantized
        assert part is not None  # only quantized steps come here
        name = step.tensor.name
        if name in self._kept:
            return self._kept.pop(name)
        weight, base = part.weight, self.plan.base
        where = str(base.path)
        device = self.factors.device
        parts = {local: tensor.to(device) for local, tensor in (read or read_parts(base, weight)).items()}
        if part.dequantize:
            whole = self.factors.summed(step, tuple(weight.shape)).mul_(self.sign) if step.terms else None
            return requant.dequantize(weight, parts, whole, torch_dtype(step.out_dtype), where)
        rows = self._rows(step) if weight.method == "fp8-block" else None
        delta = rows or self.factors.summed(step, tuple(weight.shape)).mul_(self.sign)
        merged = requant.merge_in_format(weight, parts, delta, where)
        if not merged.finite:
            raise NumericError(f"{where}: {weight.name}: merging the adapter in format gives non-finite scales")
        if any(t.piece is not None for t in step.terms) and all(
            torch.equal(merged.tensors[weight.parts[local]], parts[local]) for local in weight.rewritten
        ):
            raise NumericError(
                f"{where}: {weight.name}: the merge leaves this expert's stored values unchanged (its ΔW is zero or "
                f"below the quantization step), and lorasurgeon never leaves a targeted expert silently unchanged"
            )
        self.figures.setdefault(weight.name, Requantized(weight.name, merged.survival, merged.error))
        self._kept.update((stored, tensor) for stored, tensor in merged.tensors.items() if stored != name)
        return merged.tensors[name]

    def take_kept(self, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """After `compute`: the other rewritten parts of its weight that are `wanted` (the later tensors of the shard
        being written, written ahead), handed over; of the rest, those over KEPT_BYTES are dropped."""
        taken = {name: tensor for name, tensor in self._kept.items() if wanted(name)}
        self._kept = {
            name: tensor
            for name, tensor in self._kept.items()
            if name not in taken and tensor.numel() * tensor.element_size() <= KEPT_BYTES
        }
        return taken

    def _rows(self, step: Step) -> DeltaRows | None:
        """ΔW's rows computed as the FP8 merge asks for them (never the whole ΔW of a large weight), when every
        term is a pair of factors; None otherwise (LyCORIS, fused q/k/v rows: the whole ΔW). Safe to call from
        several threads (lorasurgeon.fp8_kernel runs a band per thread): one matrix's factors are fetched once,
        under a lock (the factors' cache is not thread-safe), made contiguous, and the products run outside it."""
        if not all(blockwise(t) or fused_term(t) for t in step.terms):
            return None
        terms, factors, sign = step.terms, self.factors, self.sign
        lock, held = threading.Lock(), dict[int, list[Matrices]]()

        def matrices(expert: int) -> list[Matrices]:
            with lock:
                if expert not in held:  # the bands come matrix by matrix: only the latest one's are held
                    fetched = (factors.matrices(t, expert if fused_term(t) else None) for t in terms)
                    held.clear()
                    held[expert] = [(a.contiguous(), b.contiguous(), k, t) for a, b, k, t in fetched]
                return held[expert]

        def rows(expert: int, start: int, stop: int) -> torch.Tensor:
            first, *rest = matrices(expert)
            total = blocks.delta_rows(first, start, stop)
            for term in rest:
                total.add_(blocks.delta_rows(term, start, stop))
            return total.neg_() if sign < 0 else total

        return rows


@dataclass(frozen=True)
class Work:
    """What the steps of one merge share beyond buffers (lorasurgeon.workspace): the adapter factors read so far
    (an experts module's A and B serve all its tensors), and the quantized weights' state and figures."""

    factors: Factors
    requantizer: Requantizer

    @classmethod
    def of(cls, plan: Plan, device: torch.device, sign: int) -> Work:
        factors = Factors(plan, device)
        return cls(factors, Requantizer(plan, factors, sign))
