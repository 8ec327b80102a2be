"""The ΔW of a plan's terms in fp32: LoRA factors, LyCORIS modules, lora_B biases and pieces of MoE experts
deltas, read through a small cache (one experts module's A and B serve all E · parts tensors it changes).

A term on a per-expert tensor is that expert's factors, B_e's rows sliced to the tensor's piece: an ordinary
(A, B) pair for the blockwise merge. A term on a fused experts tensor (E, ·, ·) is merged one expert at a time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from lorasurgeon import experts, linalg, lycoris
from lorasurgeon.errors import NumericError
from lorasurgeon.header import TensorInfo
from lorasurgeon.placement import Term
from lorasurgeon.plan import Plan, Step

FACTOR_KINDS = ("linear", "conv", "embedding")  # ΔW = B @ A, up to a reshape or a transpose
KEPT_FACTORS = 8  # an experts module's A and B, and the other module of its layer, stay read
Matrices = tuple[torch.Tensor, torch.Tensor, float, bool]


class Factors:
    """Reads the adapter tensors of `plan`'s terms onto `device`, keeping the last KEPT_FACTORS read."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self._kept: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

    def read(self, adapter: int, info: TensorInfo) -> torch.Tensor:
        key = (adapter, info.name)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        tensor = self.plan.adapters[adapter].source.read(info).to(self.device)
        self._kept[key] = tensor
        if len(self._kept) > KEPT_FACTORS:
            self._kept.popitem(last=False)
        return tensor

    def matrices(self, term: Term, expert: int | None = None) -> Matrices:
        """(A, B, factor, transpose) of a LoRA term as fp32 matrices (r, in·∏k) and (out, r); of an experts term,
        its expert's (`expert`, else the piece's) with B_e's rows cut to the piece."""
        a, b = self.read(term.adapter, term.module.a), self.read(term.adapter, term.module.b)
        piece = term.piece
        if piece is not None:
            index = piece.expert if expert is None else expert
            assert index is not None  # a fused term is taken one expert at a time
            b, a = experts.expert_factors(a, b, term.module.experts, index)
            if piece.expert is not None:
                b = b[piece.start : piece.stop : piece.step]
            return a.float(), b.float(), term.factor, term.transpose
        a, b = a.float(), b.float()
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), term.factor, term.transpose

    def delta(self, term: Term) -> torch.Tensor:
        """One term's ΔW in fp32, laid out like the tensor it changes (a lora_B bias: factor · b)."""
        module = term.module
        if term.bias and module.bias is not None:
            return self.read(term.adapter, module.bias).float().mul(term.factor)
        if module.factors:
            factors = {role: self.read(term.adapter, info) for role, info in module.factors.items()}
            return lycoris.delta(module.kind, factors, term.factor, term.shape)
        if term.piece is not None and term.piece.expert is None:  # the whole fused parameter: (E, ·, ·)
            a, b = self.read(term.adapter, module.a), self.read(term.adapter, module.b)
            return experts.expert_deltas(a.float(), b.float(), term.factor, module.experts, term.transpose)
        if term.piece is not None:
            a, b, factor, _ = self.matrices(term)
            return linalg.lora_delta(a, b, factor, False)
        a, b = self.read(term.adapter, module.a), self.read(term.adapter, module.b)
        if module.kind == "conv":
            return linalg.conv_delta(a, b, term.factor)
        # flatten(1) squeezes 1×1 conv factors that the plan applies to a Linear base; matrices stay as they are.
        return linalg.lora_delta(a.flatten(1), b.flatten(1), term.factor, term.transpose)

    def summed(self, step: Step, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Σ of the step's term deltas in fp32, shaped like the step's tensor (or `shape`); a term with `rows` (q,
        k or v of a fused in_proj_weight) fills only those rows, so they still meet in one tensor added once."""
        whole = [t for t in step.terms if t.rows is None]
        delta = self.delta(whole[0]) if whole else torch.zeros(shape or step.tensor.shape, device=self.device)
        for term in whole[1:]:
            delta += self.delta(term)
        for term in step.terms:
            if term.rows is not None:
                delta[term.rows[0] : term.rows[1]] += self.delta(term)
        return delta


def blockwise(term: Term) -> bool:
    """Whether the term is a pair of factor matrices the blockwise merge takes as they are."""
    plain = term.module.kind in FACTOR_KINDS and term.piece is None
    per_expert = term.piece is not None and term.piece.expert is not None
    return (plain or per_expert) and not (term.bias or term.dora) and term.rows is None


def fused_term(term: Term) -> bool:
    """Whether the term is an experts module's whole fused delta, (E, ·, ·)."""
    return term.piece is not None and term.piece.expert is None and not term.bias


def fused_experts(step: Step) -> bool:
    """Whether every term of the step is an experts module's whole fused delta (merged one expert at a time)."""
    return bool(step.terms) and all(fused_term(t) for t in step.terms)


def merge_fused(
    factors: Factors, step: Step, weight: torch.Tensor, sign: int, dtype: torch.dtype
) -> tuple[torch.Tensor, bool]:
    """round(fp32(W) + sign · ΔW) of a fused experts tensor (E, ·, ·), expert by expert through the blockwise
    merge, and whether every value fit `dtype`."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    ok = True
    for expert in range(weight.shape[0]):
        matrices = [factors.matrices(term, expert) for term in step.terms]
        out[expert], fit = linalg.merge_blockwise(weight[expert], matrices, sign, dtype)
        ok = ok and fit
    return out, ok


def unchanged_experts(step: Step, before: torch.Tensor, after: torch.Tensor) -> list[str]:
    """The experts of the step's experts terms whose stored values the merge left as they were ("expert 3 of
    model.layers.0.mlp.experts.gate_up_proj"): the self-test that no targeted expert is silently skipped."""
    found = []
    for term in step.terms:
        piece = term.piece
        if piece is None:
            continue
        name = f"{term.module.module}.{term.module.parameter}"
        rounded = before.to(after.dtype)
        if piece.expert is not None and torch.equal(rounded, after):
            found.append(f"expert {piece.expert} of {name}")
        elif piece.expert is None:
            found += [f"expert {e} of {name}" for e in range(after.shape[0]) if torch.equal(rounded[e], after[e])]
    return found


def checked(step: Step, before: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result`, once the self-test holds: a targeted expert whose stored values the merge leaves as they were
    (`before`) is an error, never a silent fallback to the base weight."""
    unchanged = unchanged_experts(step, before, result) if any(t.piece is not None for t in step.terms) else []
    if unchanged:
        raise NumericError(
            f"{step.tensor.path.name}: {step.tensor.name}: the merge leaves {unchanged[0]} unchanged (its ΔW is "
            f"zero, or below the {step.out_dtype} step everywhere); lorasurgeon never leaves a targeted expert "
            "silently unchanged"
        )
    return result
