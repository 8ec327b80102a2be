"""The additive non-LoRA tuners, as a table: tuner -> the function from a TunerModule and its fp32 tensors
to ΔW (out, in), or the conv kernel's shape (tuner_merge transposes it for Conv1D and adds). The formulas
are in tuner_maths and lycoris; this module only picks each tuner's tensors and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lorasurgeon import lycoris, tuner_maths
from lorasurgeon.adapter import Layer, TunerModule

Tensors = Mapping[str, torch.Tensor]


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


def _adalora(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    shape = (d.out, d.inner) if len(d.shape) == 2 else d.shape
    return tuner_maths.adalora_delta(
        f["lora_A"], f["lora_B"], f["lora_E"], m.params["scaling"], m.params["ranknum"], shape
    )


def _lycoris(kind: str) -> Callable[[TunerModule, Tensors, Dims], torch.Tensor]:
    def delta(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
        if kind == "lokr" and "lokr_w2" in f and f["lokr_w2"].dim() == 3:
            # PEFT's make_kron on a Conv1d's full (b, d, k) lokr_w2 takes torch.kron of a 2-D by a 3-D tensor,
            # which pads w1 to (1, a, c): the result is laid out (b, a·d, c·k), then reshaped to the kernel.
            w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
            kron: torch.Tensor = torch.kron(w1, f["lokr_w2"]) * m.params["scale"]
            return kron.reshape(d.shape)
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

    a, b = tuner_maths.vblora_factors(half("vblora_logits_A"), half("vblora_logits_B"), f["vblora_vector_bank"])
    return b @ a  # (out, r) @ (r, in)


def _miss(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    mini = m.params["mini_r"] if m.params["kind"] == "mini" else None
    return tuner_maths.miss_delta(f["miss_block"], d.out, d.inner, mini)


def _supertuning(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    delta = tuner_maths.supertuning_delta(f["supertuning_indices"], f["supertuning_values"], (d.out, d.inner))
    if "supertuning_lora_A.weight" in f:
        delta += (f["supertuning_lora_B.weight"] @ f["supertuning_lora_A.weight"]) * m.params["lora_scaling"]
    return delta


def _pvera(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    # pvera/layer.py get_delta_weight: the merge keeps the mean, the first half of λ_d and of A's rows
    half = f["pvera_lambda_d"].shape[0] // 2
    return tuner_maths.vera_delta(
        f["pvera_lambda_b"], f["pvera_lambda_d"][:half], f["pvera_A"][:half], f["pvera_B"], d.out, d.inner
    )


def _unilora(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    a, b = tuner_maths.unilora_factors(
        f["unilora_theta_d"],
        (f["unilora_indices_A"], f["unilora_indices_B"]),
        (f["unilora_scales_A"], f["unilora_scales_B"]),
    )
    return b @ a  # (out, r) @ (r, in)


def _randlora(m: TunerModule, f: Tensors, d: Dims) -> torch.Tensor:
    lam, gamma = f["randlora_lambda"], f["randlora_gamma"]
    a, b = tuner_maths.randlora_factors(lam, gamma, f["randlora_A"], f["randlora_B"], d.out, d.inner)
    delta: torch.Tensor = (b @ a) * m.params["scaling"]
    return delta


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
    "RANDLORA": _randlora,
    "SUPERTUNING": _supertuning,
    "PVERA": _pvera,
    "UNILORA": _unilora,
    "TINYLORA": lambda m, f, d: tuner_maths.tinylora_delta(
        f["tinylora_A"], f["tinylora_B"], f["tinylora_P"], f[m.params["vector"]]
    ),
}


def additive_delta(module: TunerModule, factors: Tensors, dims: Dims) -> torch.Tensor | None:
    """ΔW (out, in) of an additive module (MiSS too, but with init "bat"), or None for a multiplicative one."""
    if module.tuner == "MISS":
        return None if module.params["kind"] == "bat" else _miss(module, factors, dims)
    fn = ADDITIVE.get(module.tuner)
    return fn(module, factors, dims) if fn else None
