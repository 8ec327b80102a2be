"""The orthogonal PEFT tuners: W rotated or reflected (OFT, BOFT, HRA, RoAd), as pure functions of fp32
tensors, no I/O. Each `*_merge` returns the new weight and each `*_unmerge` its inverse.

W is the weight as a matrix: Linear (out, in); a conv kernel flattened row-major to (out, in·kh·kw), which
is the layout PEFT's OFT/BOFT/HRA rotate. Sources: PEFT 0.21 `oft/layer.py`, `boft/layer.py`, `hra/layer.py`,
`road/layer.py` (file and function per docstring). Rotations are formed in fp64 (small matrices; the inverse
of a Cayley-Neumann series, which is not exactly orthogonal, is a solve).
"""

from __future__ import annotations

import torch


def _skew_from_triu(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size, size) skew-symmetric Q from (n, size·(size−1)/2) upper-triangle entries in row-major order."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    upper = torch.zeros(vec.shape[0], size, size, dtype=vec.dtype, device=vec.device)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def oft_blocks(weight: torch.Tensor, size: int, coft: bool, eps: float, neumann_terms: int) -> torch.Tensor:
    """OFT's rotation blocks (oft/layer.py `OFTRotationModule.get_weight`), (n, size, size) in fp64.

    With coft, each block's skew matrix Q (from its triangle) is first pulled onto the Frobenius ball of radius
    eps/√n (`_project_batch`). Then Cayley: R = (I − Q)(I + Q)⁻¹, or with use_cayley_neumann PEFT's truncated
    series (`_cayley_batch`): R = I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1) for t = num_cayley_neumann_terms ≥ 3
    (t = 4 is t = 3's I + 2Q + 2Q² + Q³), R = I + 2Q for t = 2, I for t = 1.
    """
    q = _skew_from_triu(weight.double(), size)
    if coft:
        radius = eps / torch.sqrt(torch.tensor(float(q.shape[0]), dtype=torch.float64))
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= radius, q, radius * q / norm)
    eye = torch.eye(size, dtype=torch.float64, device=q.device).expand_as(q)
    if not neumann_terms:
        exact: torch.Tensor = torch.linalg.solve(eye + q, eye - q, left=False)
        return exact
    r = eye.clone()
    if neumann_terms > 1:
        r += 2 * q
    if neumann_terms > 2:
        power = q @ q
        r += 2 * power
        for _ in range(3, neumann_terms - 1):
            power = power @ q
            r += 2 * power
        r += power @ q
    return r


def oft_merge(w: torch.Tensor, blocks: torch.Tensor, embedding: bool) -> torch.Tensor:
    """OFT merged (oft/layer.py `Linear.merge`, `Conv2d.merge`, `Embedding.merge`): W R ᵀ for a Linear or a
    1×1 conv (the input is rotated), W R for an Embedding (its output is), R = diag(blocks) block-diagonal.
    `blocks` (n, b, b) is repeated when it holds one shared block (block_share)."""
    rows, cols = w.shape
    size = blocks.shape[-1]
    r = blocks.expand(cols // size, size, size) if blocks.shape[0] == 1 else blocks
    grouped = w.double().reshape(rows, cols // size, size)
    spec = "ogk,gkc->ogc" if embedding else "ogk,gck->ogc"
    return torch.einsum(spec, grouped, r).reshape(rows, cols).float()


def oft_unmerge(w: torch.Tensor, blocks: torch.Tensor, embedding: bool) -> torch.Tensor:
    """The inverse of oft_merge: W R⁻ᵀ (W R⁻¹ for an Embedding), solved block by block in fp64."""
    inverse = torch.linalg.inv(blocks.double())
    return oft_merge(w, inverse, embedding)


def boft_rotation(boft_r: torch.Tensor, dim: int) -> torch.Tensor:
    """BOFT's butterfly rotation (boft/layer.py `get_delta_weight`), (dim, dim) in fp64: for each of the N
    butterfly factors, the Cayley transforms (I − S)(I + S)⁻¹ of S = ½(R − Rᵀ) of its D blocks (H, H) on the
    diagonal, conjugated by the factor's block-butterfly permutation P (`block_butterfly_perm`): M = P B Pᵀ;
    the rotation is M_{N−1} ⋯ M_0."""
    factors, blocks, size, _ = boft_r.shape
    data = boft_r.double()
    skew = 0.5 * (data - data.transpose(-2, -1))
    eye = torch.eye(size, dtype=torch.float64, device=data.device).expand_as(skew)
    cayley = torch.linalg.solve(eye + skew, eye - skew, left=False)
    rotation = torch.eye(dim, dtype=torch.float64, device=data.device)
    for i in range(factors):
        perm = butterfly_permutation(dim, blocks // 2**i, size // 2, factors - 1).to(data.device)
        block = torch.block_diag(*cayley[i])  # type: ignore[no-untyped-call]
        # P x picks x[perm]: P B Pᵀ is B with rows and columns both taken in `perm` order.
        rotation = block[perm][:, perm] @ rotation
    return rotation


def butterfly_permutation(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """BOFT's block-butterfly permutation of n indices (boft/layer.py `block_butterfly_perm`): identity for a
    single factor; else within each run of n/blocks indices, the chunks of `half` taken evens first, then odds."""
    indices = torch.arange(n)
    if factors == 0:
        return indices
    run = n // blocks
    chunks = run // half
    order = torch.cat([torch.arange(half * c, half * (c + 1)) for c in [*range(0, chunks, 2), *range(1, chunks, 2)]])
    return torch.cat([indices[i : i + run][order] for i in range(0, n, run)])


def boft_merge(w: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """BOFT merged (boft/layer.py `Linear.merge`, `Conv2d.merge`): (W Rᵀ) ⊙ s, s (out, 1) scaling rows."""
    return ((w.double() @ rotation.T) * scale.double().reshape(-1, 1)).float()


def boft_unmerge(w: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of boft_merge: (W ⊘ s) R (R is orthogonal)."""
    return ((w.double() / scale.double().reshape(-1, 1)) @ rotation).float()


def hra_merge(w: torch.Tensor, u: torch.Tensor, apply_gs: bool, reverse: bool = False) -> torch.Tensor:
    """HRA (hra/layer.py `HRALinear.get_delta_weight`, `merge`): W H, H a product of r Householder reflections.

    u (in·∏k, r) is normalised column by column and H = (I − 2u₁u₁ᵀ)(I − 2u₂u₂ᵀ)⋯ (reversed order unmerges,
    each reflection being its own inverse); with apply_GS the columns are Gram-Schmidt orthonormalised in order
    and H = I − 2UUᵀ, which is its own inverse.
    """
    x = w.double()
    vectors = u.double()
    if apply_gs:
        basis: list[torch.Tensor] = []
        for i in range(vectors.shape[1]):
            v = vectors[:, i]
            for e in basis:
                v = v - (e @ v) * e
            basis.append(v / v.norm())
        q = torch.stack(basis, dim=1)
        return (x - 2 * (x @ q) @ q.T).float()
    vectors = vectors / vectors.norm(dim=0)
    order = range(vectors.shape[1] - 1, -1, -1) if reverse else range(vectors.shape[1])
    for i in order:
        v = vectors[:, i : i + 1]
        x = x - 2 * (x @ v) @ v.T
    return x.float()


def road_columns(variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """RoAd's per-output (first, second) coefficients (road/layer.py `_prepare_cols`), each (out,)."""
    if variant == "road_1":
        theta = theta.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, group), alpha.reshape(-1, 2, group)
    return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[:, 1].sin().flatten()


def road_merge(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, group: int) -> torch.Tensor:
    """RoAd (road/layer.py `_apply_road`, `Linear.merge`): R x for the rows of W (out, in) or a bias (out,).

    Outputs pair up within each group of `group`: the h-th of its first half (x₁) with the h-th of its second
    (x₂), and R maps them to (f₁x₁ − s₁x₂, s₂x₁ + f₂x₂), f and s the `first` and `second` coefficients at the
    two positions. Applied to W's rows this is PEFT's merge R W (and R b for the bias).
    """
    f1, f2, s1, s2 = _road_pairs(first, second, group, x.dim() - 1)
    v = x.reshape(-1, 2, group // 2, *x.shape[1:])  # (groups, 2, half, ...)
    x1, x2 = v[:, 0], v[:, 1]
    return torch.stack([f1 * x1 - s1 * x2, s2 * x1 + f2 * x2], dim=1).reshape(x.shape)


def road_unmerge(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of road_merge: each pair's map [[f₁, −s₁], [s₂, f₂]] inverted, det = f₁f₂ + s₁s₂."""
    f1, f2, s1, s2 = _road_pairs(first, second, group, x.dim() - 1)
    det = f1 * f2 + s1 * s2
    v = x.reshape(-1, 2, group // 2, *x.shape[1:])
    y1, y2 = v[:, 0], v[:, 1]
    return torch.stack([(f2 * y1 + s1 * y2) / det, (f1 * y2 - s2 * y1) / det], dim=1).reshape(x.shape)


def road_determinants(first: torch.Tensor, second: torch.Tensor, group: int) -> torch.Tensor:
    """f₁f₂ + s₁s₂ of each output pair: RoAd is invertible where none is zero."""
    f1, f2, s1, s2 = _road_pairs(first, second, group, 0)
    return f1 * f2 + s1 * s2


def _road_pairs(first: torch.Tensor, second: torch.Tensor, group: int, trailing: int) -> tuple[torch.Tensor, ...]:
    """(f₁, f₂, s₁, s₂): the coefficients at each pair's two positions, (groups, half) and `trailing` unit
    dimensions to broadcast over W's columns."""
    f = first.reshape(-1, 2, group // 2, *(1,) * trailing)
    s = second.reshape(-1, 2, group // 2, *(1,) * trailing)
    return f[:, 0], f[:, 1], s[:, 0], s[:, 1]
