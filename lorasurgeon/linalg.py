"""Pure tensor maths for LoRA surgery: no I/O, no device policy, no error types beyond what torch raises.

Shapes follow PEFT: A is (r, in), B is (out, r), and a delta is laid out like the weight it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lorasurgeon.blocks import delta_rows, folded


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """ΔW = scale · (B @ A), transposed for weights stored (in, out) (transformers Conv1D), in fp32.

    The product is formed before scaling, as PEFT's get_delta_weight does, so results agree to rounding.
    (Not a fused addmm into W: BLAS may accumulate the rank-r products into W one by one, rounding r times
    at the magnitude of W, which PEFT does not.)
    """
    delta = b.float() @ a.float()  # (out, r) @ (r, in) -> (out, in)
    delta.mul_(scale)
    return delta.T if transpose else delta


def add_delta_(exact: torch.Tensor, delta: torch.Tensor, sign: int) -> None:
    """exact += sign · ΔW, in place on an fp32 tensor; the caller rounds it once to the stored dtype.

    `sign` is ±1, so this is bit for bit PEFT's fp32(W) ± ΔW, without W- or ΔW-sized temporaries.
    """
    exact.add_(delta, alpha=sign)


# Rows of W merged at a time on CPU: blocks of ~2 MiB of fp32 stay in cache through the matmul, the add and the
# rounding, where whole-tensor steps stream W, ΔW and fp32(W) through memory several times (~6x slower).
BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK_ROWS = 64  # fewer rows make the matmul inefficient and the per-block overhead show


def merge_blockwise(
    weight: torch.Tensor,
    factors: list[tuple[torch.Tensor, torch.Tensor, float, bool]],
    sign: int,
    dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    parallel: Callable[..., Iterable[bool]] | None = None,
    parts: int = 2,
) -> tuple[torch.Tensor, bool]:
    """round(fp32(W) + sign · Σ scale·(B @ A)) to `dtype`, a block of W's rows at a time, and whether every
    value fit `dtype` (see `fits`).

    `factors` are (A, B, scale, transpose) with A (r, n) and B (m, r) matrices (conv kernels flattened);
    W is viewed as (m, n), or (n, m) with `transpose`. The order of operations is the whole-tensor route's
    (lora_delta per term, summed in order, add_delta_, one rounding); only the r products of each ΔW element
    may be summed in another order by BLAS for a block's shape than for the whole matrix's (fp32 rounding).
    A scale that is a power of two ≥ 1, and the sign, are folded into A: multiplying by ±2^k changes only the
    exponent, so every product and sum is that of the unfolded route times ±2^k, bit for bit (but for products
    below fp32's normal range, 2^-126), and the pass that scaled each block is saved.

    `out` (any shape of W's size, of `dtype`) receives the result, so a caller can reuse buffers (a fresh
    one costs a page fault per 4 KiB). `parallel`, a map such as a thread pool's `Executor.map`, computes
    `parts` runs of consecutive blocks concurrently: each block is computed exactly as it is sequentially
    (torch releases the GIL), so the result does not change.
    """
    flat = weight.reshape(weight.shape[0], -1)
    rows, columns = flat.shape
    result = torch.empty(flat.shape, dtype=dtype, device=weight.device) if out is None else out.view(flat.shape)
    step = rows if weight.is_cuda else max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(columns, 1))
    terms = [folded(term, sign) for term in factors]
    spans = [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def merge_run(run: list[tuple[int, int]]) -> bool:
        buffer = torch.empty(step * columns, device=weight.device)  # one fp32 block, reused
        ok = True
        for start, stop in run:
            block = delta_rows(terms[0], start, stop, buffer)
            for term in terms[1:]:
                block.add_(delta_rows(term, start, stop))
            block.add_(flat[start:stop])
            result[start:stop] = block
            ok = ok and _rounded_fit(block, result[start:stop], dtype)
        return ok

    if parallel is None or len(spans) < 2 * parts:
        return result.view(weight.shape), merge_run(spans)
    share = -(-len(spans) // parts)
    runs = [spans[i : i + share] for i in range(0, len(spans), share)]
    return result.view(weight.shape), all(list(parallel(merge_run, runs)))


# Output dtypes whose rounding turns anything out of range into ±Inf (and keeps NaN): for them a finite sum of
# the rounded block proves every value fit, in one pass over half the bytes (a sum that overflows, or NaN/Inf,
# only sends the caller to its exact checks).
ROUNDS_TO_INF = (torch.float32, torch.float16, torch.bfloat16)


def _rounded_fit(exact: torch.Tensor, rounded: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype in ROUNDS_TO_INF:
        return bool(torch.isfinite(rounded.sum(dtype=torch.float32)).item())
    return fits(exact, dtype)


def fits(exact: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every value of fp32 `exact` is finite and within `dtype`'s range: one pass, no masks.

    NaN propagates into aminmax, so a True answer needs no further NaN/Inf/overflow counting.
    """
    if exact.numel() == 0:
        return True
    low, high = torch.aminmax(exact)
    limit = torch.finfo(dtype).max
    return -low.item() <= limit and high.item() <= limit  # False for NaN and ±Inf as well


def conv_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW of a ConvNd LoRA in fp32: A is (r, in, *k), B is (out, r, 1, ...); ΔW is (out, in, *k).

    Composing the k×k conv A with the 1×1 conv B is one matmul over the flattened kernel (FORMATS.md §2.4);
    it equals PEFT's 1×1 squeeze path and its conv path up to fp32 rounding.
    """
    rank = a.shape[0]
    delta = b.float().reshape(b.shape[0], rank) @ a.float().reshape(rank, -1)  # (out, r) @ (r, in·∏k)
    return delta.reshape(b.shape[0], *a.shape[1:]).mul_(scale)


def dora_rescale(merged: torch.Tensor, magnitude: torch.Tensor, out_dim: int) -> torch.Tensor:
    """DoRA's merged weight: V = W + ΔW rescaled so each output feature has norm m (FORMATS.md §2.7), in fp32.

    `out_dim` is the axis of output features in V's storage layout (1 for Conv1D (in, out) weights and for
    embeddings (V, d), whose norms PEFT takes per column); the L2 norm runs over every other axis, no epsilon.
    """
    v = merged.float()
    others = [d for d in range(v.dim()) if d != out_dim]
    norm = torch.linalg.vector_norm(v, dim=others, keepdim=True)  # (out,) laid along out_dim
    scale: torch.Tensor = magnitude.float().reshape(norm.shape) / norm
    return v * scale


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many elements are NaN or ±Inf (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum().item())


def overflow_count(exact: torch.Tensor, rounded: torch.Tensor) -> int:
    """How many finite values of `exact` became ±Inf when rounded (e.g. past fp16's 65504)."""
    return int((torch.isfinite(exact) & ~torch.isfinite(rounded)).sum().item())


STATS_CHUNK = 1 << 22  # elements up-cast to fp64 at a time by tensor_stats (32 MB)


def tensor_stats(tensor: torch.Tensor) -> tuple[int, int, float | None, float | None, float | None, float | None]:
    """(NaN count, ±Inf count, min, max, mean, std) of a tensor; the last four over its finite values only
    (std with Bessel's correction, 0 for a single value), None when it has none. Computed in fp64, a chunk at a
    time, so neither a huge value's square nor the up-cast of a large tensor overflows."""
    flat = tensor.reshape(-1)
    chunks = [flat[i : i + STATS_CHUNK] for i in range(0, flat.numel(), STATS_CHUNK)]
    nan = inf = n = 0
    total, low, high = 0.0, float("inf"), float("-inf")
    for chunk in chunks:
        x = chunk.double()
        finite = x[torch.isfinite(x)]
        nan += int(torch.isnan(x).sum().item())
        inf += int(torch.isinf(x).sum().item())
        if finite.numel():
            n += finite.numel()
            total += finite.sum().item()
            low, high = min(low, finite.min().item()), max(high, finite.max().item())
    if n == 0:
        return nan, inf, None, None, None, None
    mean = total / n
    square = sum(((x := c.double())[torch.isfinite(x)] - mean).square().sum().item() for c in chunks)
    return nan, inf, low, high, mean, (square / (n - 1)) ** 0.5 if n > 1 else 0.0


def lora_delta_norms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(‖BA‖_F, ‖BA‖_2, stable rank ‖BA‖_F² / ‖BA‖_2²) from r×r Gram matrices, never forming BA itself.

    A is (r, in, *k) and B is (out, r, *1) (embeddings: A (r, V), B (d, r)); both are flattened to matrices.
    The squared singular values of BA are the eigenvalues of G_B^½ G_A G_B^½ with G_A = AAᵀ, G_B = BᵀB.
    """
    if a.numel() == 0 or b.numel() == 0:
        return 0.0, 0.0, 0.0
    a2 = a.reshape(a.shape[0], -1).double()
    b2 = b.reshape(b.shape[0], -1).double()
    gram_a = a2 @ a2.T  # (r, in) @ (in, r) -> (r, r)
    gram_b = b2.T @ b2  # (r, out) @ (out, r) -> (r, r)
    values, vectors = torch.linalg.eigh(gram_b)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # G_B^½, (r, r)
    sigma2 = torch.linalg.eigvalsh(root @ gram_a @ root).clamp(min=0)
    fro2, top = sigma2.sum().item(), sigma2.max().item()
    return fro2**0.5, top**0.5, fro2 / top if top > 0 else 0.0


# --- Truncated SVD for extraction: ΔW ≈ B·A with B = U_r·diag(√σ_r), A = diag(√σ_r)·V_rᵀ -------------------


def exact_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, σ, Vᵀ) of a 2-D fp32 delta: (m, k), (k,), (k, n) with k = min(m, n)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u, s, vh


def randomized_svd(
    delta: torch.Tensor, rank: int, oversample: int, max_iters: int, tol: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Rank-`rank + oversample` SVD by a Gaussian range finder refined with QR-orthonormalised power
    iterations, stopped when the rank-`rank` error has converged. Returns (U, σ, Vᵀ, converged).

    Every sketch Q gives U·diag(σ)·Vᵀ = Q·Qᵀ·ΔW, so its rank-r truncation has error² exactly
    ‖ΔW‖² − Σ_{i≤r} σ_i² (the projection theorem): the guard watches that number. It stops when one more
    iteration lowers it by at most `tol` of itself (plus a floor of 1e-10·‖ΔW‖², i.e. fp32 noise) and
    reports `converged=False` when `max_iters` pass first; the caller then falls back to the exact SVD.
    Iterations cost two (m, n) @ (n, k) products each; the small (k, n) SVD costs k²·n.
    """
    m, n = delta.shape
    k = min(rank + oversample, m, n)
    total = float(torch.linalg.matrix_norm(delta).item()) ** 2
    omega = torch.randn(n, k, generator=generator, device=delta.device, dtype=delta.dtype)
    q = torch.linalg.qr(delta @ omega).Q  # (m, n) @ (n, k) -> (m, k), orthonormal columns
    previous = float("inf")
    for iteration in range(max_iters + 1):
        small = q.T @ delta  # (k, m) @ (m, n) -> (k, n)
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
        error = max(total - float(s[:rank].double().square().sum().item()), 0.0)
        converged = previous - error <= tol * error + 1e-10 * total
        if converged or iteration == max_iters:
            return q @ u_small, s, vh, converged  # (m, k) @ (k, k) -> (m, k)
        previous = error
        z = torch.linalg.qr(small.T).Q  # (n, k): the row space, orthonormalised (one power iteration)
        q = torch.linalg.qr(delta @ z).Q
    raise AssertionError("unreachable")


def split_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with scale · B @ A = U_r·diag(σ_r)·V_rᵀ, the singular values split evenly: √(σ/scale) in each."""
    root = (s[:rank] / scale).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]  # (m, r), (r, n)


def energy_rank(s: torch.Tensor, total: float, fraction: float) -> int:
    """The smallest r whose Σ_{i≤r} σ_i² reaches `fraction` of `total` (= ‖ΔW‖²_F); len(s) if none does.

    fraction 1 keeps every singular value computed: Σσ² and an fp32 ‖ΔW‖² agree only to rounding.
    """
    if fraction >= 1:
        return len(s)
    captured = torch.cumsum(s.double().square(), 0)
    reached = int(torch.searchsorted(captured, torch.tensor([fraction * total], dtype=torch.float64)).item())
    return max(1, min(reached + 1, len(s)))


def relative_errors(s: torch.Tensor, total: float, ranks: list[int], complete: bool) -> list[float]:
    """‖ΔW − (rank-r truncation)‖_F / ‖ΔW‖_F for each r, from the singular values of one SVD.

    With the `complete` spectrum the error is the tail √(Σ_{i>r} σ_i²), exact even when tiny; otherwise it is
    √(total − Σ_{i≤r} σ_i²), which fp32 cancellation blurs below about 3e-4 · ‖ΔW‖.
    """
    squares = s.double().square()
    if complete:  # tails[i] = Σ_{j>i} σ_j², summed from the small end
        total = float(squares.sum().item())
        tails = [*torch.flip(torch.cumsum(torch.flip(squares, [0]), 0), [0])[1:].tolist(), 0.0]
    else:
        tails = (total - torch.cumsum(squares, 0)).tolist()
    out = []
    for r in ranks:
        tail = tails[min(r, len(tails)) - 1]
        out.append((max(tail, 0.0) / total) ** 0.5 if total > 0 else 0.0)
    return out


def rounding_excess(
    value: torch.Tensor, expected: torch.Tensor, delta: torch.Tensor, dtypes: tuple[torch.dtype, ...]
) -> float:
    """How far `value` (merged − ΔW, in fp32) is from `expected` beyond what a merge and an unmerge can round:
    |value − expected| ≤ 2u·(|expected| + |ΔW|) elementwise, u the unit roundoff of the coarsest of `dtypes`, and at
    least 2⁻²⁰ (ΔW in fp32 is summed in another order by the tool that merged). 0 when within; else the largest
    excess."""
    unit = max(2.0**-20, *(_UNIT_ROUNDOFF.get(d, 2.0**-24) for d in dtypes))
    expected = expected.float()
    bound = 2 * unit * (expected.abs() + delta.abs())
    excess = ((value - expected).abs() - bound).clamp_min(0)
    return float(excess.max().item()) if excess.numel() else 0.0


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
