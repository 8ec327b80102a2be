"""The PEFT tuners whose new weight is a product with the base weight, not a rotation: (IA)³, HiRA, GLoRA,
MiSS "bat", DEFT, OSF. Pure functions of fp32 tensors, no I/O; W is (out, in) unless said otherwise (the
caller transposes transformers Conv1D weights to it and back). Sources: PEFT 0.21, file and function per
docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def ia3_vector(vector: torch.Tensor, w_shape: torch.Size, feedforward: bool, transpose: bool) -> torch.Tensor:
    """IA3's scaling laid out to broadcast against W (ia3/layer.py `Linear.merge`, `_ConvNd.merge` and
    `_get_ia3_scaling_for_weight`): a feedforward module scales W's input columns, any other its output rows
    (and its bias). Linear vectors are (1, in) or (out, 1), transposed for Conv1D; conv vectors (1, C, 1, …)
    become (out, 1, 1, …) for rows, and for a grouped conv's columns are split per group."""
    if len(w_shape) <= 2:
        return vector.T if transpose else vector
    if not feedforward:
        return vector.transpose(0, 1)
    per_group = w_shape[1]
    groups = vector.shape[1] // per_group
    if groups == 1:
        return vector
    out_per_group = w_shape[0] // groups
    grouped = vector.reshape(groups, 1, per_group, *vector.shape[2:])
    return grouped.expand(groups, out_per_group, per_group, *vector.shape[2:]).reshape(
        w_shape[0], per_group, *vector.shape[2:]
    )


def miss_bat_merge(w: torch.Tensor, block: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """MiSS with init_weights "bat" (miss/layer.py `get_delta_weight`): each r×r block W_ij of W (out block i,
    in block j) becomes W_ij + W_ij M_i + M_i with M = miss_block (out/r, r, r); `reverse` undoes it:
    W_ij = (W'_ij − M_i)(I + M_i)⁻¹."""
    out, inner = w.shape
    r = block.shape[-1]
    tiles = w.double().reshape(out // r, r, inner // r, r).permute(0, 2, 1, 3)  # [i, j, :, :]
    m = block.double()[:, None]  # (out/r, 1, r, r): M_i for every j
    if reverse:
        eye = torch.eye(r, dtype=torch.float64, device=w.device)
        result = torch.linalg.solve(eye + m, (tiles - m), left=False)
    else:
        result = tiles + tiles @ m + m
    merged: torch.Tensor = result.permute(0, 2, 1, 3).reshape(out, inner).float()
    return merged


def hira_merge(w: torch.Tensor, delta: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """HiRA (hira/layer.py `HiraLayer._merge`): W ⊙ (1 + ΔW), ΔW = B A laid out as W; `reverse`: W' ⊘ (1 + ΔW)."""
    return w / (1 + delta) if reverse else w + w * delta


def glora_merge(
    w: torch.Tensor,
    bias: torch.Tensor | None,
    paths: dict[str, torch.Tensor | float],
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLoRA (glora/layer.py `GloraLayer.merge`, `unmerge`): W' = W + W ⊙ A + B and b' = b + b ⊙ D + E + W C,
    with the original W in the bias; paths A, B (broadcasting to (out, in)), C (in, 1), D, E (broadcasting to
    (out,)), 0 for an absent path. `reverse`: W = (W' − B) ⊘ (1 + A), b = (b' − E − W C) ⊘ (1 + D)."""
    a, b, c, d, e = (paths[p] for p in "ABCDE")
    w0 = (w - b) / (1 + a) if reverse else w
    if bias is None:
        return (w0 if reverse else w + w * a + b), None
    wc = (w0 @ c).squeeze(-1) if isinstance(c, torch.Tensor) else 0.0  # (out, in) @ (in, 1): W₀ C
    if reverse:
        return w0, (bias - e - wc) / (1 + d)
    return w + w * a + b, bias + bias * d + e + wc


def deft_projection(p: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, G) of DEFT's projector Q Gᵀ (deft/layer.py `_project`): relu: Q = P, G = relu(P); qr: Q = G, the
    Q of P's QR decomposition (in fp32, as PEFT forms it: the signs of Q's columns follow LAPACK's)."""
    if method == "relu":
        return p, torch.relu(p)
    q, _ = torch.linalg.qr(p.float())
    return q, q


def deft_merge(
    w: torch.Tensor, q: torch.Tensor, g: torch.Tensor, r: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """DEFT (deft/layer.py `get_delta_weight`, `_delta_from_factor`): W' = W + Q (s·R − Gᵀ W), or W − Q Gᵀ W
    with PaRa (no R). Q, G (out, r), R (r, in)."""
    m = g.T @ w  # (r, out) @ (out, in)
    return w - q @ m if r is None else w + q @ (r * scaling - m)


def deft_unmerge(
    w: torch.Tensor, q: torch.Tensor, g: torch.Tensor, r: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """The inverse of deft_merge: with Y = W' − s·Q R, W = (I − Q Gᵀ)⁻¹ Y = Y + Q (I − Gᵀ Q)⁻¹ Gᵀ Y (Woodbury),
    in fp64; singular when Gᵀ Q has an eigenvalue 1 (always, for qr)."""
    y = w.double() - (0 if r is None else q.double() @ (r.double() * scaling))
    core = torch.eye(q.shape[1], dtype=torch.float64, device=q.device) - g.double().T @ q.double()
    result: torch.Tensor = (y + q.double() @ torch.linalg.solve(core, g.double().T @ y)).float()
    return result


def osf_merge(w: torch.Tensor, u_low: torch.Tensor, s_low: torch.Tensor, v_low: torch.Tensor) -> torch.Tensor:
    """OSF (osf/layer.py `get_delta_weight`, osf/utils.py `decompose_weight_matrix`): W keeps its top
    k = min(out, in) − n singular directions and its bottom n are replaced by U_low diag(S_low) V_low:
    W' = W + (U_low S_low V_low − U₀ S₀ V₀), U₀ S₀ V₀ the bottom n of W's SVD. The SVD is taken in fp32, as
    PEFT takes it: where W's singular values k and k+1 are close, which directions are "bottom" is decided by
    rounding, and this follows PEFT's."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    k = s.shape[0] - s_low.shape[0]
    initial = (u[:, k:] * s[k:]) @ vh[k:]
    merged: torch.Tensor = w + ((u_low * s_low) @ v_low - initial)
    return merged


def frod_merge(
    w: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    size: tuple[int, ...],
    values: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """FRoD (frod/layer.py `_calculate_frod_u_and_lambda`, `get_delta_weight`): W' = U (S + diag λ) Vᵀ.

    V (in, in) is the category's shared basis, S the sparse (in, in) core with `values` at `indices` (repeats
    add up), λ (in,) the trained diagonal; U is W's coordinates on V, Bᵢ = W V⁻ᵀ (solved in fp64; a
    pseudo-inverse with rtol 1e-6 when V is singular, as PEFT falls back to), its columns normalised (those of
    norm ≤ 1e-12 left zero)."""
    x, basis = w.double(), v.double()
    try:
        coords = torch.linalg.solve(basis, x.T).T  # (out, in)
    except RuntimeError:  # torch.linalg.LinAlgError: V is singular
        coords = x @ torch.linalg.pinv(basis, rtol=1e-6).T
    norms = torch.linalg.norm(coords, dim=0)
    u = torch.zeros_like(coords)
    keep = norms > 1e-12
    u[:, keep] = coords[:, keep] / norms[keep]
    core = torch.zeros(size, dtype=torch.float32, device=values.device)
    core.index_put_(tuple(indices.long()), values, accumulate=True)
    core += torch.diag(lam)
    merged: torch.Tensor = u.float() @ core @ v.float().T  # PEFT forms U in fp64, rounds it, then works in fp32
    return merged


def peanut_delta(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    encoders: list[torch.Tensor],
    decoders: list[torch.Tensor],
    activation: str,
    scaling: float,
) -> torch.Tensor:
    """PEANUT (peanut/layer.py `_compute_delta_weight`): ΔW = scaling · Hᵀ, H a small network of Wᵀ: with
    f the activation, H₀ = f(Wᵀ Aᵀ) (in, r); Hᵢ₊₁ = f(Hᵢ Eᵢᵀ) through the encoders; then through the decoders
    in turn H ← f(H Dᵢᵀ) + the encoder input of the same depth (a U-Net skip); finally H ← H Bᵀ (in, out)."""
    f: Callable[[torch.Tensor], torch.Tensor] = _ACTIVATIONS[activation]
    h = f(w.T @ a.T)
    skips = []
    for e in encoders:
        skips.append(h)
        h = f(h @ e.T)
    for d, skip in zip(decoders, reversed(skips), strict=True):
        h = f(h @ d.T) + skip
    delta: torch.Tensor = ((h @ b.T) * scaling).T
    return delta


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu6": torch.nn.functional.relu6,
    "leaky_relu": torch.nn.functional.leaky_relu,
}
