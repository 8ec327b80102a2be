"""LyCORIS LoHa and LoKr: the dense ΔW their factors stand for, as pure functions of tensors and shapes; no I/O.

The roles are LyCORIS' tensor names (`lycoris/modules/loha.py`, `lokr.py`), and the scale is alpha / rank:
- LoHa: ΔW = (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b), w_a (out, r), w_b (r, in·∏k). With Tucker cores
  hada_t1 / hada_t2 (r, r, *k), each half is its core contracted with w_a (r, out) and w_b (r, in).
  The rank is r (hada_w1_b's rows).
- LoKr: ΔW = kron(w1, w2), w1 = lokr_w1 (a, c) or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2 (b, d·∏k),
  lokr_w2_a @ lokr_w2_b, or the Tucker core lokr_t2 between lokr_w2_a (r, b) and lokr_w2_b (r, d). The rank
  is the inner size of w1's factors, else of w2's; with both halves full matrices there is none and the
  scale is 1 whatever the alpha (LyCORIS `LokrModule`: "use scale = 1").
Conv factors come flattened, (r, in·∏k), or not, (r, in, *k); ΔW takes the base weight's layout by a
row-major reshape, as LyCORIS' `weight.view(shape)` does.

DoRA in kohya / LyCORIS files (`dora_scale`, on LoRA, LoHa and LoKr alike; FORMATS.md §5.3) rescales the
merged weight by `weight_decompose`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """What a module's factor shapes say: ΔW's shape (2-D when conv factors are flattened), the rank alpha is
    divided by (None: the scale is 1), or why the factors do not fit together (a clause: "lacks hada_w2_b")."""

    shape: Shape = ()
    rank: int | None = None
    problem: str | None = None


ALGORITHMS = ("loha", "lokr", "locon-tucker")  # the module kinds this module computes


def delta(kind: str, factors: Mapping[str, torch.Tensor], scale: float, shape: Shape) -> torch.Tensor:
    """scale · ΔW of a module of `kind` (one of ALGORITHMS) in fp32, laid out as `shape` (the base weight's)."""
    return {"loha": loha_delta, "lokr": lokr_delta, "locon-tucker": locon_tucker_delta}[kind](factors, scale, shape)


def locon_tucker_delta(factors: Mapping[str, torch.Tensor], scale: float, shape: Shape) -> torch.Tensor:
    """scale · ΔW of a LoCon module with a Tucker core: lora_down (r, in, 1, 1) then the k×k conv lora_mid
    (r, r, *k) then lora_up (out, r, 1, 1), composed into one (out, in, *k) kernel (LyCORIS `rebuild_tucker`)."""
    up, down = factors["lora_up"], factors["lora_down"]
    rank = down.shape[0]
    composed = _half(up.reshape(up.shape[0], rank).T, down.reshape(rank, -1), factors["lora_mid.weight"])
    return composed.mul_(scale).reshape(shape)


def loha_delta(factors: Mapping[str, torch.Tensor], scale: float, shape: Shape) -> torch.Tensor:
    """scale · ΔW of a LoHa module in fp32, laid out as `shape` (the base weight's)."""
    w1 = _half(factors["hada_w1_a"], factors["hada_w1_b"], factors.get("hada_t1"))
    w2 = _half(factors["hada_w2_a"], factors["hada_w2_b"], factors.get("hada_t2"))
    return (w1 * w2).mul_(scale).reshape(shape)


def lokr_delta(factors: Mapping[str, torch.Tensor], scale: float, shape: Shape) -> torch.Tensor:
    """scale · ΔW of a LoKr module in fp32, laid out as `shape` (the base weight's)."""
    w1 = factors["lokr_w1"].float() if "lokr_w1" in factors else _half(factors["lokr_w1_a"], factors["lokr_w1_b"])
    if "lokr_w2" in factors:
        w2 = factors["lokr_w2"].float()
    else:
        w2 = _half(factors["lokr_w2_a"], factors["lokr_w2_b"], factors.get("lokr_t2"))
    # kron((a, c), (b, d·∏k)) is (a·b, c·d·∏k), whose rows are row-major (out, in, *k) with in = c·d.
    import torch  # here, not at the top: the adapter reader and header-only reports use the layouts only

    return torch.kron(w1, w2.reshape(w2.shape[0], -1)).mul_(scale).reshape(shape)


def _half(up: torch.Tensor, down: torch.Tensor, core: torch.Tensor | None = None) -> torch.Tensor:
    """One low-rank product in fp32: up (out, r) @ down (r, in, ...) -> (out, in·∏k); with a Tucker core
    (r, r, *k), up is (r, out) and down (r, in) -> (out, in, *k)."""
    if core is None:
        return up.float() @ down.float().reshape(down.shape[0], -1)  # (out, r) @ (r, in·∏k)
    import torch

    return torch.einsum("ij...,ip,jq->pq...", core.float(), up.float(), down.float())


def layout(kind: str, shapes: Mapping[str, Shape]) -> Layout:
    """The Layout of a module of `kind` (one of ALGORITHMS) from its factors' shapes (role -> shape)."""
    if kind == "loha":
        return _loha_layout(shapes)
    if kind == "locon-tucker":
        return _locon_tucker_layout(shapes)
    return _lokr_layout(shapes)


def _locon_tucker_layout(shapes: Mapping[str, Shape]) -> Layout:
    down, mid, up = shapes.get("lora_down"), shapes.get("lora_mid.weight"), shapes.get("lora_up")
    if down is None or up is None or mid is None:
        return Layout(problem="lacks lora_down or lora_up beside its lora_mid")
    rank = down[0] if down else 0
    if len(mid) < 3 or mid[:2] != (rank, rank) or len(up) < 2 or up[1] != rank or any(k != 1 for k in up[2:]):
        return Layout(
            problem=f"has lora_down {list(down)}, lora_mid {list(mid)} and lora_up {list(up)}, which do not compose"
        )
    if len(down) < 2 or any(k != 1 for k in down[2:]):
        return Layout(problem=f"has a lora_down {list(down)} that is no 1×1 kernel")
    return Layout((up[0], down[1], *mid[2:]), rank)


def fits(dense: Shape, base: Shape) -> bool:
    """Whether ΔW of shape `dense` is laid out as the base weight: a 2-D ΔW (out, in·∏k) fits every base with
    that many rows and columns once flattened (LyCORIS stores conv factors flattened); any other must be equal."""
    if len(dense) == 2 and len(base) >= 2:
        return dense == (base[0], math.prod(base[1:]))
    return dense == base


def _loha_layout(shapes: Mapping[str, Shape]) -> Layout:
    if ("hada_t1" in shapes) != ("hada_t2" in shapes):
        return Layout(problem="has one Tucker core of hada_t1 / hada_t2 without the other")
    halves = [_half_layout(shapes, f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}") for i in (1, 2)]
    first, second = halves
    problem = first.problem or second.problem
    if problem:
        return Layout(problem=problem)
    if first.rank != second.rank or _flat(first.shape) != _flat(second.shape):
        return Layout(
            problem=f"has hada_w1 factors giving {list(first.shape)} at rank {first.rank} but hada_w2 factors "
            f"giving {list(second.shape)} at rank {second.rank}"
        )
    return first if len(first.shape) > 2 else second


def _lokr_layout(shapes: Mapping[str, Shape]) -> Layout:
    for whole, parts in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))):
        both = [p for p in parts if p in shapes]
        if whole in shapes and both:
            return Layout(problem=f"holds both {whole} and {', '.join(both)}, so its {whole} is ambiguous")
    if "lokr_w1" in shapes:
        w1 = (
            Layout(shapes["lokr_w1"])
            if len(shapes["lokr_w1"]) == 2
            else Layout(problem="has a lokr_w1 that is not a matrix")
        )
    else:
        w1 = _half_layout(shapes, "lokr_w1_a", "lokr_w1_b", None)
        if w1.problem is None and len(w1.shape) != 2:
            w1 = Layout(problem="has a lokr_w1_b that is not a matrix")
    if "lokr_w2" in shapes:
        w2 = (
            Layout(shapes["lokr_w2"])
            if len(shapes["lokr_w2"]) >= 2
            else Layout(problem="has a lokr_w2 that is not a matrix")
        )
    else:
        w2 = _half_layout(shapes, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    problem = w1.problem or w2.problem
    if problem:
        return Layout(problem=problem)
    if w1.rank is not None and w2.rank is not None and w1.rank != w2.rank:
        return Layout(problem=f"has lokr_w1 factors of rank {w1.rank} but lokr_w2 factors of rank {w2.rank}")
    (a, c), (b, d, *k) = w1.shape, w2.shape
    return Layout((a * b, c * d, *k), w1.rank if w1.rank is not None else w2.rank)


def _half_layout(shapes: Mapping[str, Shape], up_role: str, down_role: str, core_role: str | None) -> Layout:
    """The Layout of one low-rank product (see `_half`), naming the factors that do not fit."""
    up, down = shapes.get(up_role), shapes.get(down_role)
    core = shapes.get(core_role) if core_role else None
    if up is None or down is None:
        return Layout(problem=f"lacks {' and '.join(r for r, s in ((up_role, up), (down_role, down)) if s is None)}")
    if core is not None:
        if len(up) != 2 or len(down) != 2 or len(core) < 2 or core[0] != core[1] or (up[0], down[0]) != core[:2]:
            return Layout(
                problem=f"has Tucker factors {up_role} {list(up)}, {core_role} {list(core)}, {down_role} "
                f"{list(down)} do not fit together"
            )
        return Layout((up[1], down[1], *core[2:]), core[0])
    if len(up) != 2 or len(down) < 2 or up[1] != down[0]:
        return Layout(problem=f"has {up_role} {list(up)} and {down_role} {list(down)}, which do not multiply")
    return Layout((up[0], *down[1:]), up[1])


def _flat(shape: Shape) -> Shape:
    return (shape[0], math.prod(shape[1:])) if shape else shape


def dora_axis(scale: Shape, weight: Shape) -> int | None:
    """The axis of W whose norms a kohya / LyCORIS `dora_scale` replaces: 0 for (out, 1, …) (LyCORIS' default,
    wd_on_out), 1 for (1, in, 1, …); None when it has neither shape."""
    ones = (1,) * (len(weight) - 1)
    if scale == (weight[0], *ones):
        return 0
    if len(weight) >= 2 and scale == (1, weight[1], *ones[1:]):
        return 1
    return None


def weight_decompose(merged: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' DoRA at multiplier 1, in fp32: W' = dora_scale · V / (‖V‖ + ε) for V = W + scale·ΔW, the norm
    over every axis but the one `dora_scale` keeps (see dora_axis), ε fp32's machine epsilon, as LyCORIS adds."""
    v = merged.float()
    keep = dora_axis(tuple(dora_scale.shape), tuple(v.shape))
    others = [d for d in range(v.dim()) if d != keep]
    import torch

    norm = torch.linalg.vector_norm(v, dim=others, keepdim=True) + torch.finfo(torch.float32).eps
    scale: torch.Tensor = dora_scale.float() / norm
    return v * scale


def delta_norms(delta: torch.Tensor) -> tuple[float, float, float]:
    """(‖ΔW‖_F, ‖ΔW‖_2, stable rank ‖ΔW‖_F² / ‖ΔW‖_2²) of a dense ΔW flattened to (out, in·∏k), in fp64.

    LoHa and LoKr have no low-rank product to take Gram matrices of (a LoHa of rank r has rank up to r²).
    """
    import torch

    sigma = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    fro2, top = float(sigma.square().sum().item()), float(sigma.max().item()) if sigma.numel() else 0.0
    return fro2**0.5, top, fro2 / top**2 if top > 0 else 0.0
