"""Merge and unmerge one module of a non-LoRA PEFT tuner: the entry point the plan and the surgery call.

`merge(module, base, factors, layer=...)` takes the base tensors the module writes ("weight", "bias"; any
replacement already applied), its tensors by role (the module's own and the adapter's shared ones), and how
the base layer stores its weight, and returns the new tensors in fp32 (the caller rounds once). `unmerge`
inverts it where the files allow, else raises UnsupportedError naming why; `check` says from shapes alone
whether a module fits its base (for `check` / `--dry-run`). The formulas are in tuner_maths (additive
tuners), rotations (multiplicative ones) and lycoris (LoHa / LoKr).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorasurgeon import lycoris, rotations, tuner_maths
from lorasurgeon.errors import MismatchError, UnsupportedError
from lorasurgeon.tuner import Layer, TunerModule
from lorasurgeon.tuner_shapes import fit_problem, layer_problem

if TYPE_CHECKING:
    import torch

Tensors = Mapping[str, "torch.Tensor"]


@dataclass(frozen=True)
class Dims:
    """The base weight seen as a matrix: `out` × `inner` (a conv kernel flattened), its stored `shape`."""

    out: int
    inner: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], layer: Layer) -> Dims:
        if layer == "conv1d":
            return cls(shape[1], shape[0], shape)
        return cls(shape[0], math.prod(shape[1:]), shape)


def merge(module: TunerModule, base: Tensors, factors: Tensors, *, layer: Layer = "linear") -> dict[str, torch.Tensor]:
    """The module's new base tensors (those of `module.writes` the base has), in fp32.

    Raises MismatchError when the tensors do not fit the base, UnsupportedError for a layer the tuner does
    not adapt exactly.
    """
    f, b = _prepare(module, base, factors, layer)
    additive = ADDITIVE.get(module.tuner)
    if additive is not None:
        w = b["weight"]
        d = additive(module, f, Dims.of(tuple(w.shape), layer))
        return {"weight": w + (d.T if layer == "conv1d" else d)}
    return MULTIPLICATIVE[module.tuner][0](module, b, f, layer)


def unmerge(
    module: TunerModule, merged: Tensors, factors: Tensors, *, layer: Layer = "linear"
) -> dict[str, torch.Tensor]:
    """The base tensors before `merge`, from the merged ones; UnsupportedError where the files cannot give them."""
    why = unmerge_refusal(module.tuner)
    if why:
        raise UnsupportedError(f"module {module.module}: cannot unmerge {module.tuner}: {why}")
    f, b = _prepare(module, merged, factors, layer)
    additive = ADDITIVE.get(module.tuner)
    if additive is not None:
        w = b["weight"]
        d = additive(module, f, Dims.of(tuple(w.shape), layer))
        return {"weight": w - (d.T if layer == "conv1d" else d)}
    return MULTIPLICATIVE[module.tuner][1](module, b, f, layer)


def delta(module: TunerModule, shape: tuple[int, ...], factors: Tensors, *, layer: Layer = "linear") -> torch.Tensor:
    """ΔW of an additive module (see is_additive) in the layout of a base weight of `shape`, in fp32."""
    f = {k: v.float() if v.is_floating_point() else v for k, v in factors.items()}
    dims = Dims.of(shape, layer)
    d = _miss_delta(module, f, dims) if module.tuner == "MISS" else ADDITIVE[module.tuner](module, f, dims)
    return d.T if layer == "conv1d" else d


def is_additive(module: TunerModule) -> bool:
    """Whether the module adds a ΔW that does not depend on the base weight (so unmerge subtracts it): every
    tuner in ADDITIVE, and MiSS but with init_weights "bat"."""
    return module.tuner in ADDITIVE or (module.tuner == "MISS" and module.params.get("kind") != "bat")


def unmerge_refusal(tuner: str) -> str | None:
    """Why a tuner can never be unmerged from its files, or None (data can still refuse: a zero IA3 entry)."""
    return NOT_INVERTIBLE.get(tuner)


def check(
    module: TunerModule, base: Mapping[str, tuple[int, ...]], factors: Mapping[str, tuple[int, ...]], layer: Layer
) -> str | None:
    """A clause saying why the module does not fit base tensors of these shapes (None: it fits)."""
    return layer_problem(module, base, layer) or fit_problem(module, base, factors, layer)


def _prepare(module: TunerModule, base: Tensors, factors: Tensors, layer: Layer) -> tuple[Tensors, Tensors]:
    problem = check(
        module, {k: tuple(v.shape) for k, v in base.items()}, {k: tuple(v.shape) for k, v in factors.items()}, layer
    )
    if problem:
        raise MismatchError(f"module {module.module} {problem}")
    f = {k: v.float() if v.is_floating_point() else v for k, v in factors.items()}
    return f, {k: v.float() for k, v in base.items()}


# --- additive tuners: ΔW (out, inner) or the conv kernel's shape -------------------------------------------------


def _adalora(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    shape = (d.out, d.inner) if len(d.shape) == 2 else d.shape
    return tuner_maths.adalora_delta(
        f["lora_A"], f["lora_B"], f["lora_E"], m.params["scaling"], m.params["ranknum"], shape
    )  # type: ignore[arg-type]


def _lycoris(kind: str) -> Callable[[TunerModule, Tensors, Dims], torch.Tensor]:
    def delta(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
        if kind == "lokr" and "lokr_w2" in f and f["lokr_w2"].dim() == 3:
            # PEFT's make_kron on a Conv1d's full (b, d, k) lokr_w2 takes torch.kron of a 2-D by a 3-D tensor,
            # which pads w1 to (1, a, c): the result is laid out (b, a·d, c·k), then reshaped to the kernel.
            import torch

            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            return (torch.kron(w1, f["lokr_w2"]) * m.params["scale"]).reshape(d.shape)
        return lycoris.delta(kind, f, m.params["scale"], d.shape)

    return delta


def _spectrum(fn: str) -> Callable[[TunerModule, Tensors, Dims], torch.Tensor]:
    def delta(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
        p = m.params
        idx = tuner_maths.spectrum_indices(d.out, d.inner, p["n"], p["seed"])
        if fn == "fourierft":
            return tuner_maths.fourierft_delta(f["fourierft_spectrum"], idx, d.out, d.inner, p["scaling"])
        return tuner_maths.waveft_delta(f["waveft_spectrum"], idx, d.out, d.inner, p["scaling"], p["idwt"])

    return delta


def _vblora(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    def half(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name in f:
            return tuner_maths.vblora_weights(f[name], m.params["topk"])
        return tuner_maths.vblora_saved_topk(f[f"{name}_topk_indices"], f[f"{name}_topk_weights"])

    return tuner_maths.vblora_delta(half("vblora_logits_A"), half("vblora_logits_B"), f["vblora_vector_bank"])


ADDITIVE: dict[str, Callable[[TunerModule, Tensors, Dims], torch.Tensor]] = {
    "ADALORA": _adalora,
    "LOHA": _lycoris("loha"),
    "LOKR": _lycoris("lokr"),
    "VERA": lambda m, f, d: tuner_maths.vera_delta(
        f["vera_lambda_b"], f["vera_lambda_d"], f["vera_A"], f["vera_B"], d.out, d.inner
    ),
    "FOURIERFT": _spectrum("fourierft"),
    "WAVEFT": _spectrum("waveft"),
    "SHIRA": lambda m, f, d: tuner_maths.shira_delta(
        f["shira_indices"], f["shira_weight"], d.out, d.inner, m.params["scaling"]
    ),
    "C3A": lambda m, f, d: tuner_maths.c3a_delta(f["c3a_kernel"]),
    "DELORA": lambda m, f, d: tuner_maths.delora_delta(
        f["delora_A"], f["delora_B"], f["delora_lambda"], m.params["r"], f["delora_w_norm"]
    ),
    "GRALORA": lambda m, f, d: tuner_maths.gralora_delta(
        f["gralora_A"],
        f["gralora_B"],
        m.params["scaling"],
        f.get("gralora_A_general.weight"),
        f.get("gralora_B_general.weight"),
    ),
    "VBLORA": _vblora,
    "RANDLORA": lambda m, f, d: tuner_maths.randlora_delta(
        f["randlora_lambda"], f["randlora_gamma"], f["randlora_A"], f["randlora_B"], d.out, d.inner, m.params["scaling"]
    ),
}


# --- multiplicative tuners and replacements: (merge, unmerge) of the base tensors -------------------------------

Step = Callable[[TunerModule, Tensors, Tensors, Layer], "dict[str, torch.Tensor]"]


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _ia3(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        vector = f["ia3_l"]
        if inverse and bool((vector == 0).any()):
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge IA3: its vector ia3_l has a zero entry, which erased that "
                "part of the weight"
            )
        w = b["weight"]
        scale = rotations.ia3_vector(vector, w.shape, m.params["feedforward"], layer == "conv1d")
        out = {"weight": w / scale if inverse else w * scale}
        if not m.params["feedforward"] and "bias" in b:
            v = vector.reshape(b["bias"].shape)
            out["bias"] = b["bias"] / v if inverse else b["bias"] * v
        return out

    return step


def _oft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        p, w = m.params, b["weight"]
        vec = f["oft_embedding_R.weight"] if layer == "embedding" else f["oft_R.weight"]
        blocks = rotations.oft_blocks(vec, p["block_size"], p["coft"], p["eps"], p["neumann_terms"])
        fn = rotations.oft_unmerge if inverse else rotations.oft_merge
        if layer == "embedding":
            return {"weight": fn(w, blocks, True)}
        return {"weight": fn(_flat(w), blocks, False).reshape(w.shape)}

    return step


def _boft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w, scale = b["weight"], f["boft_s"]
        if inverse and bool((scale == 0).any()):
            raise UnsupportedError(f"module {m.module}: cannot unmerge BOFT: its scale boft_s has a zero entry")
        flat = _flat(w)
        rotation = rotations.boft_rotation(f["boft_R"], flat.shape[1])
        fn = rotations.boft_unmerge if inverse else rotations.boft_merge
        return {"weight": fn(flat, rotation, scale).reshape(w.shape)}

    return step


def _hra(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w = b["weight"]
        new = rotations.hra_merge(_flat(w), f["hra_u"], m.params["apply_gs"], reverse=inverse)
        return {"weight": new.reshape(w.shape)}

    return step


def _road(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        group = m.params["group_size"]
        first, second = rotations.road_columns(m.params["variant"], group, f["road_theta"], f["road_alpha"])
        if inverse and bool((rotations.road_determinants(first, second, group) == 0).any()):
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge RoAd: a pair of its outputs is scaled to zero (road_alpha 0)"
            )
        fn = rotations.road_unmerge if inverse else rotations.road_merge
        return {k: fn(v, first, second, group) for k, v in b.items() if k in ("weight", "bias")}

    return step


def _miss(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w = b["weight"]
        if m.params["kind"] == "bat":
            return {"weight": rotations.miss_bat_merge(w, f["miss_block"], reverse=inverse)}
        d = _miss_delta(m, f, Dims.of(tuple(w.shape), layer))
        return {"weight": w - d if inverse else w + d}

    return step


def _miss_delta(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    mini = m.params["mini_r"] if m.params["kind"] == "mini" else None
    return tuner_maths.miss_delta(f["miss_block"], d.out, d.inner, mini)


def _ln_tuning(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    return {param: f[f"ln_tuning_layers.{param}"] for param in m.writes}


def _trainable_tokens(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    import torch

    index = torch.tensor(m.params["indices"], dtype=torch.long)
    return {"weight": b["weight"].index_copy(0, index, f["trainable_tokens_delta"])}


def _refused(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    raise UnsupportedError(f"module {m.module}: cannot unmerge {m.tuner}: {NOT_INVERTIBLE[m.tuner]}")


MULTIPLICATIVE: dict[str, tuple[Step, Step]] = {
    "IA3": (_ia3(False), _ia3(True)),
    "OFT": (_oft(False), _oft(True)),
    "BOFT": (_boft(False), _boft(True)),
    "HRA": (_hra(False), _hra(True)),
    "ROAD": (_road(False), _road(True)),
    "MISS": (_miss(False), _miss(True)),
    "LN_TUNING": (_ln_tuning, _refused),
    "TRAINABLE_TOKENS": (_trainable_tokens, _refused),
}
NOT_INVERTIBLE = {
    "LN_TUNING": "LN tuning replaces the module's parameters, and the adapter does not hold the originals",
    "TRAINABLE_TOKENS": "trainable tokens replace embedding rows, and the adapter does not hold the original rows",
}
