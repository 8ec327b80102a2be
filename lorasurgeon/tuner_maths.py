"""The ΔW of the PEFT tuners whose update is added to the weight and does not depend on it: pure functions of
fp32 tensors, no I/O. Each returns ΔW laid out (out, in) (conv: the base kernel's shape); the caller transposes
for transformers Conv1D and adds. The formulas restate PEFT 0.21's `get_delta_weight` of each tuner's
`layer.py` (the file is named per function); where PEFT's forward computes the same update another way, the
two agree (checked against PEFT in tests/test_tuners.py).
"""

from __future__ import annotations

import math

import torch


def adalora_delta(
    a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, scaling: float, ranknum: float, shape: tuple[int, ...]
) -> torch.Tensor:
    """AdaLoRA (adalora/layer.py `SVDLinear.get_delta_weight`): ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5),
    A (r, in·∏k), E (r, 1) the singular values (zero where the budget masked them), B (out, r); ranknum is
    init_r, kept through the rank pruning, and the 1e-5 is PEFT's, added in fp32."""
    denominator = torch.tensor(ranknum, dtype=torch.float32) + 1e-5
    return ((b @ (a * e)) * scaling / denominator).reshape(shape)  # (out, r) @ (r, in)


def vera_delta(
    lambda_b: torch.Tensor, lambda_d: torch.Tensor, vera_a: torch.Tensor, vera_b: torch.Tensor, out: int, inner: int
) -> torch.Tensor:
    """VeRA (vera/layer.py `Linear.get_delta_weight`): ΔW = (λ_b ⊙ B[:out]) (λ_d ⊙ A[:, :in]), with the shared
    random A (r, max in) and B (max out, r) sliced to the layer, λ_b (out,), λ_d (r,)."""
    return (lambda_b[:, None] * vera_b[:out]) @ (lambda_d[:, None] * vera_a[:, :inner])  # (out, r) @ (r, in)


def spectrum_indices(out: int, inner: int, n: int, seed: int) -> torch.Tensor:
    """The (2, n) row/column indices FourierFT and WaveFT place their n coefficients at: the first n of a
    permutation of the out·in positions drawn by torch's CPU generator seeded with random_loc_seed
    (fourierft/layer.py and waveft/layer.py `update_layer`). PEFT never saves them; it draws them again at
    load time, so these match PEFT run with the same torch."""
    flat = torch.randperm(out * inner, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // inner, flat % inner])


def fourierft_delta(
    spectrum: torch.Tensor, indices: torch.Tensor, out: int, inner: int, scaling: float
) -> torch.Tensor:
    """FourierFT (fourierft/layer.py `get_delta_weight`): ΔW = Re(ifft2(F)) · scaling, F the (out, in) spectrum
    that is zero but at `indices` (see spectrum_indices)."""
    dense = torch.zeros(out, inner, device=spectrum.device)
    dense[tuple(indices.to(spectrum.device))] = spectrum
    delta: torch.Tensor = torch.fft.ifft2(dense).real * scaling
    return delta


def waveft_delta(
    spectrum: torch.Tensor, indices: torch.Tensor, out: int, inner: int, scaling: float, idwt: bool
) -> torch.Tensor:
    """WaveFT (waveft/layer.py `get_delta_weight`) with the Haar wavelet (db1): ΔW = scaling · IDWT(C), C the
    sparse coefficient matrix (zero but at `indices`) padded to even sides, cropped back to (out, in).

    One level of the 2-D Haar inverse: with quadrants cA | cH over cV | cD of C, ΔW[2i+a, 2j+b] =
    ½ (cA + (−1)ᵃ cH + (−1)ᵇ cV + (−1)ᵃ⁺ᵇ cD)[i, j]. Without `idwt`, ΔW = scaling · C.
    """
    indices = indices.to(spectrum.device)
    if not idwt:
        dense = torch.zeros(out, inner, device=spectrum.device)
        dense[indices[0], indices[1]] = spectrum
        return dense * scaling
    rows, cols = out + out % 2, inner + inner % 2  # db1 reduces no size; odd sides get one padding row/column
    dense = torch.zeros(rows, cols, device=spectrum.device)
    dense[indices[0], indices[1]] = spectrum
    h, w = rows // 2, cols // 2
    ca, ch, cv, cd = dense[:h, :w], dense[:h, w:], dense[h:, :w], dense[h:, w:]
    rec = torch.empty(h, 2, w, 2, device=spectrum.device)
    for a in (0, 1):
        for b in (0, 1):
            rec[:, a, :, b] = 0.5 * (ca + (-1) ** a * ch + (-1) ** b * cv + (-1) ** (a + b) * cd)
    return rec.reshape(rows, cols)[:out, :inner] * scaling


def shira_delta(indices: torch.Tensor, values: torch.Tensor, out: int, inner: int, scaling: float) -> torch.Tensor:
    """SHiRA (shira/layer.py `get_delta_weight`): ΔW = scaling · the sparse (out, in) matrix with `values` at
    `indices` (2, n); repeated positions add up, as in torch.sparse_coo_tensor."""
    rows, cols = indices.long()
    return torch.zeros(out, inner, device=values.device).index_put_((rows, cols), values * scaling, accumulate=True)


def c3a_delta(kernel: torch.Tensor) -> torch.Tensor:
    """C3A (c3a/layer.py `get_delta_weight`, c3a/utils.py `get_circulant_fast`): a block-circulant ΔW / in,
    kernel (m, n, b) giving block (i, j) = circ(kernel[i, j]) with circ(w)[k, l] = w[(l − k) mod b];
    ΔW is (m·b, n·b) and in = n·b."""
    m, n, b = kernel.shape
    k = torch.arange(b, device=kernel.device)
    offsets = (k[None, :] - k[:, None]) % b  # (b, b): row k, column l -> (l - k) mod b
    blocks = kernel[:, :, offsets]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)


def delora_delta(
    a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, rank: float, w_norm: torch.Tensor
) -> torch.Tensor:
    """DeLoRA (delora/layer.py `_compute_delta`): ΔW = B diag(λ / r / (‖Aᵢ‖ ‖Bⁱ‖)) A · diag(w_norm), the row
    norms of A and column norms of B clamped below at 1e-4, w_norm (in,) the base weight's column norms saved
    at training start (delora_w_norm)."""
    a_norm = a.norm(dim=1).clamp(min=1e-4)
    b_norm = b.norm(dim=0).clamp(min=1e-4)
    delta: torch.Tensor = (b * (lam / rank / (a_norm * b_norm))) @ a * w_norm[None, :]  # (out, r) @ (r, in)
    return delta


def gralora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    a_general: torch.Tensor | None = None,
    b_general: torch.Tensor | None = None,
) -> torch.Tensor:
    """GraLoRA (gralora/layer.py `get_delta_weight`): k×k blocks, block (j, n) of ΔW (out block j, in block n)
    = (A[n][:, j·s:(j+1)·s] @ B[j][n·s:(n+1)·s])ᵀ with s = r/k, A (k, in/k, r), B (k, r, out/k); plus the hybrid
    LoRA B_g A_g when hybrid_r > 0; all times alpha / (r + hybrid_r)."""
    k, sub_in, rank = a.shape
    s = rank // k
    a4 = a.reshape(k, sub_in, k, s)  # [n, i, j, s]
    b4 = b.reshape(k, k, s, b.shape[2])  # [j, n, s, o]
    transposed = torch.einsum("nijs,jnso->nijo", a4, b4).reshape(k * sub_in, k * b.shape[2])  # (in, out)
    delta = transposed.T.contiguous()
    if a_general is not None and b_general is not None:
        delta += b_general @ a_general
    return delta * scaling


def vblora_weights(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of VB-LoRA's top-k vectors: the k largest logits, softmax over them
    (vblora/layer.py `_get_low_rank_matrix`)."""
    top, indices = logits.topk(topk, dim=-1)
    return indices, torch.softmax(top, dim=-1)


def vblora_saved_topk(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of a save_only_topk_weights file: it keeps k−1 weights, the last is 1 − their sum; PEFT
    turns them into logits log(w) and takes softmax again (vblora/model.py `_remap_adapter_state_dict_for_load`)."""
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    return indices.long(), torch.softmax(torch.log(full), dim=-1)


def vblora_factors(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], bank: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """VB-LoRA's A (r, in) and B (out, r) (vblora/layer.py `_get_lora_matrices`): each length-L sub-vector is the
    weighted sum of its top-k vectors of the shared bank (num_vectors, L); a = (indices, weights) of A's
    (r, in/L, k), b those of B's (out/L, r, k); ΔW = B A."""
    mat_a = (a[1].unsqueeze(-1) * bank[a[0]]).sum(-2)  # (r, in/L, L)
    mat_b = (b[1].unsqueeze(-1) * bank[b[0]]).sum(-2)  # (out/L, r, L)
    return mat_a.reshape(mat_a.shape[0], -1), mat_b.transpose(1, 2).reshape(-1, mat_b.shape[1])


def randlora_factors(
    lam: torch.Tensor, gamma: torch.Tensor, bases_a: torch.Tensor, bases_b: torch.Tensor, out: int, inner: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RandLoRA's A (rank, in) and B (out, rank) (randlora/layer.py `get_scaled_bases`, `get_delta_weight`), ΔW =
    scaling · B A: with the shared random bases A (r, 1, ≥min) and B (≥max, ≥n, r), λ (r, n), γ (n, min):
    Â = (λ ⊙ A ⊙ γ) flattened (r·n, min) over (r, n), B̂ = B[:max, :n] flattened (max, n·r) over (n, r) (PEFT pairs
    the two flattenings index by index); (A, B) = (Â, B̂) when in ≤ out, (B̂ᵀ, Âᵀ) otherwise."""
    small, large = min(out, inner), max(out, inner)
    n = lam.shape[1]
    b_hat = bases_b[:large, :n, :].flatten(start_dim=1)  # (max, n·r)
    a_hat = (lam[:, :, None] * bases_a[:, :n, :small] * gamma[None]).flatten(end_dim=1)  # (r·n, min)
    return (a_hat, b_hat) if small == inner else (b_hat.T, a_hat.T)


def unilora_factors(
    theta: torch.Tensor, indices: tuple[torch.Tensor, torch.Tensor], scales: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """UniLoRA's A (r, in) and B (out, r) (unilora/layer.py `_get_lora_matrices`): entries gathered from the one
    shared vector θ at the saved indices, times the saved fixed scales; ΔW = B A."""
    return theta[indices[0].long()] * scales[0], theta[indices[1].long()] * scales[1]


def miss_delta(block: torch.Tensor, out: int, inner: int, mini_r: int | None = None) -> torch.Tensor:
    """MiSS with init_weights True/False or "mini" (miss/layer.py `get_delta_weight_miss`): ΔW[o, c] =
    M[c mod r, o], M = miss_block (r, out) — or, for "mini", miss_block (r, mini_r) tiled out/mini_r times
    along its columns. The last partial block of columns takes M's first rows."""
    m = block.repeat(1, out // mini_r) if mini_r is not None else block  # (r, out)
    rank = m.shape[0]
    return m.T.repeat(1, math.ceil(inner / rank))[:, :inner]


def tinylora_delta(a: torch.Tensor, b: torch.Tensor, projections: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TinyLoRA (tinylora/layer.py `_compute_R`, `get_delta_weight`): ΔW = B R A with R = Σᵢ vᵢ Pᵢ (r, r);
    A = √S V (r, in) and B = U √S (out, r) the saved truncated SVD of W, P (u, r, r) the saved projections and
    v (u,) the trained vector."""
    core = torch.einsum("i,ijk->jk", v, projections)
    return b @ core @ a  # (out, r) @ (r, r) @ (r, in)


def supertuning_delta(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Supertuning's sparse part (supertuning/layer.py `get_delta_weight`): `values` scatter-added at the flat
    positions `indices` of a zero weight-shaped tensor."""
    flat = torch.zeros(math.prod(shape), device=values.device)
    return flat.index_add_(0, indices.long(), values).reshape(shape)
