"""The exact LoRA form of the non-LoRA tuners that have one (tuner_kinds.LORA_FORMS): factors A (r, in), B (out, r)
and a scale with scale · B @ A equal to the tuner's ΔW, in fp32 from its tensors; `convert` writes them.

`dims` is the base weight as a matrix (tuner_deltas.Dims: a transformers Conv1D's (in, out) weight is seen as
(out, in), which a LoRA with fan_in_fan_out stores alike). The product B @ A is the ΔW tuner_deltas adds, up to the
rounding of forming the factors first (DeLoRA's diagonals, AdaLoRA's A ⊙ E); the formulas are tuner_maths'.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lorasurgeon import tuner_maths
from lorasurgeon.adapter import TunerModule
from lorasurgeon.tuner_deltas import Dims

Tensors = Mapping[str, torch.Tensor]
Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scale


def _adalora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    # adalora/layer.py get_delta_weight: B (A ⊙ E) · scaling / (ranknum + 1e-5), the 1e-5 added in fp32
    denominator = float(torch.tensor(m.params["ranknum"], dtype=torch.float32) + 1e-5)
    return f["lora_A"] * f["lora_E"], f["lora_B"], m.params["scaling"] / denominator


def _vera(prefix: str, half: bool) -> Callable[[TunerModule, Tensors, Dims], Factors]:
    """VeRA: (λ_d ⊙ A[:, :in], λ_b ⊙ B[:out]); PVeRA's merge keeps the first (mean) half of λ_d and of A's rows."""

    def factors(m: TunerModule, f: Tensors, d: Dims) -> Factors:
        lambda_d, shared_a = f[f"{prefix}_lambda_d"], f[f"{prefix}_A"]
        rank = lambda_d.shape[0] // 2 if half else lambda_d.shape[0]
        a = lambda_d[:rank, None] * shared_a[:rank, : d.inner]
        return a, f[f"{prefix}_lambda_b"][:, None] * f[f"{prefix}_B"][: d.out], 1.0

    return factors


def _randlora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    lam, gamma = f["randlora_lambda"], f["randlora_gamma"]
    a, b = tuner_maths.randlora_factors(lam, gamma, f["randlora_A"], f["randlora_B"], d.out, d.inner)
    return a, b, m.params["scaling"]


def _vblora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    def half(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name in f:
            return tuner_maths.vblora_weights(f[name], m.params["topk"])
        return tuner_maths.vblora_saved_topk(f[f"{name}_topk_indices"], f[f"{name}_topk_weights"])

    a, b = tuner_maths.vblora_factors(half("vblora_logits_A"), half("vblora_logits_B"), f["vblora_vector_bank"])
    return a, b, 1.0


def _unilora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    indices, scales = (f["unilora_indices_A"], f["unilora_indices_B"]), (f["unilora_scales_A"], f["unilora_scales_B"])
    a, b = tuner_maths.unilora_factors(f["unilora_theta_d"], indices, scales)
    return a, b, 1.0


def _tinylora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    core = torch.einsum("i,ijk->jk", f[m.params["vector"]], f["tinylora_P"])  # R = Σ vᵢ Pᵢ (r, r)
    return f["tinylora_A"], f["tinylora_B"] @ core, 1.0


def _delora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    # delora/layer.py _compute_delta: B diag(λ / r / (‖Aᵢ‖ ‖Bⁱ‖)) A diag(w_norm), norms clamped below at 1e-4
    a, b = f["delora_A"], f["delora_B"]
    diagonal = f["delora_lambda"] / m.params["r"] / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
    return a * f["delora_w_norm"][None, :], b * diagonal, 1.0


def _gralora(m: TunerModule, f: Tensors, d: Dims) -> Factors:
    """GraLoRA's k×k blocks side by side: block (j, n) of ΔW (out block j, in block n) is B[j][n·s:(n+1)·s]ᵀ (out/k, s)
    @ A[n][:, j·s:(j+1)·s]ᵀ (s, in/k), s = r/k (tuner_maths.gralora_delta), so its s rank-one terms take columns
    (j·k + n)·s … of B' and the same rows of A', zero outside their blocks; the hybrid LoRA follows."""
    a, b = f["gralora_A"], f["gralora_B"]  # (k, in/k, r), (k, r, out/k)
    k, sub_in, rank = a.shape
    s, sub_out = rank // k, b.shape[2]
    lora_a = torch.zeros(k * k * s, k * sub_in, device=a.device)
    lora_b = torch.zeros(k * sub_out, k * k * s, device=a.device)
    for j in range(k):
        for n in range(k):
            cols = slice((j * k + n) * s, (j * k + n + 1) * s)
            lora_b[j * sub_out : (j + 1) * sub_out, cols] = b[j][n * s : (n + 1) * s].T
            lora_a[cols, n * sub_in : (n + 1) * sub_in] = a[n][:, j * s : (j + 1) * s].T
    if "gralora_A_general.weight" in f:
        lora_a = torch.cat([lora_a, f["gralora_A_general.weight"]])
        lora_b = torch.cat([lora_b, f["gralora_B_general.weight"]], dim=1)
    return lora_a, lora_b, m.params["scaling"]


FORMS: dict[str, Callable[[TunerModule, Tensors, Dims], Factors]] = {
    "ADALORA": _adalora,
    "VERA": _vera("vera", half=False),
    "PVERA": _vera("pvera", half=True),
    "RANDLORA": _randlora,
    "VBLORA": _vblora,
    "UNILORA": _unilora,
    "TINYLORA": _tinylora,
    "DELORA": _delora,
    "GRALORA": _gralora,
}


def lora_factors(module: TunerModule, factors: Tensors, dims: Dims) -> Factors:
    """(A (r, in), B (out, r), scale) in fp32 with scale · B @ A = the module's ΔW (out, in); KeyError for a tuner
    without an exact LoRA form (tuner_kinds.lora_form_refusal says why)."""
    floats = {k: v.float() if v.is_floating_point() else v for k, v in factors.items()}
    a, b, scale = FORMS[module.tuner](module, floats, dims)
    return a.contiguous(), b.contiguous(), float(scale)
