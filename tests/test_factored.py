"""The dense-free adapter algebra (factored.py, stacked_sum.py) against dense fp64 references and PEFT's `cat`.

One tolerance rule: every route here is a chain of backward-stable fp64 steps (Householder QR, LAPACK SVD,
matmul) on matrices of at most 24 + 24 rows, so each computed σ, entry or norm is within c·u·‖ΔW‖₂ of the exact
one, u = 2⁻⁵³, c of order m + n + r. TIGHT = 2⁻⁴⁰ ≈ 9e-13 (c ≈ 8000) times ‖ΔW‖ covers it with room to spare
and still fails on any real mistake (a wrong scale, a dropped term, a cross term: errors of order ‖ΔW‖).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_spectrum_rules import by_definition

from lorasurgeon import factored
from lorasurgeon.errors import MismatchError
from lorasurgeon.spectrum_rules import SpectrumRule, choose_rank
from lorasurgeon.stacked_sum import StackedSum, fedit_error, naive_relative_error

TIGHT = 2.0**-40


@st.composite
def factors(
    draw: st.DrawFn, rows: int | None = None, columns: int | None = None, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (m, r), A (r, n), scale): generic, rank-deficient (B = B₀·C), zero or with r > min(m, n)."""
    m = rows if rows is not None else draw(st.integers(1, 24))
    n = columns if columns is not None else draw(st.integers(1, 24))
    r = rank if rank is not None else draw(st.integers(0, 10))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["generic", "deficient", "zero_b", "zero_a"]))
    b = torch.randn(m, r, generator=generator) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    a = torch.randn(r, n, generator=generator)
    if kind == "deficient" and r > 1:
        b = b[:, : r // 2] @ torch.randn(r // 2, r, generator=generator)  # rank ⌊r/2⌋ < r
    elif kind == "zero_b":
        b = torch.zeros(m, r)
    elif kind == "zero_a":
        a = torch.zeros(r, n)
    return b, a, draw(st.sampled_from([1.0, 0.5, 2.0, -1.5, 1 / 8**0.5]))


def dense(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (b.double() @ a.double())  # (m, r) @ (r, n), fp64


def spectral(delta: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(delta, ord=2).item()) if delta.numel() else 0.0


# --- core_svd -----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(case=factors())
def test_core_svd_is_the_svd_of_the_dense_delta(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    b, a, scale = case
    delta = dense(b, a, scale)
    u, sigma, vh = factored.core_svd(b, a, scale)
    k = min(b.shape[0], a.shape[1], b.shape[1])
    assert u.shape == (b.shape[0], k) and sigma.shape == (k,) and vh.shape == (k, a.shape[1])
    norm = spectral(delta)
    assert torch.allclose(u * sigma @ vh, delta, rtol=0, atol=TIGHT * norm + 1e-300)
    reference = torch.linalg.svdvals(delta)[:k]  # fp64, from the dense matrix
    assert torch.allclose(sigma, reference, rtol=0, atol=TIGHT * norm + 1e-300)
    assert (sigma >= 0).all() and (sigma[:-1] >= sigma[1:]).all()
    assert torch.allclose(u.T @ u, torch.eye(k, dtype=torch.float64), atol=TIGHT * 64)
    assert torch.allclose(vh @ vh.T, torch.eye(k, dtype=torch.float64), atol=TIGHT * 64)
    assert torch.allclose(factored.spectrum(b, a, scale), sigma, rtol=0, atol=TIGHT * norm + 1e-300)
    u_kept, sigma_kept, vh_kept = factored.core_svd(b, a, scale, keep=2)  # the first vectors only, same σ
    assert torch.equal(sigma_kept, sigma) and u_kept.shape == (b.shape[0], min(2, k))
    assert torch.allclose(u_kept, u[:, :2], atol=1e-15) and torch.allclose(vh_kept, vh[:2], atol=1e-15)
    by_rule = factored.core_svd(b, a, scale, keep=lambda s: int((s > s[0] / 2).sum()) if len(s) else 0)[0]
    assert by_rule.shape[1] == (int((sigma > sigma[0] / 2).sum()) if k else 0)
    fro = float(torch.linalg.matrix_norm(delta).item())
    assert abs(factored.frobenius(b, a, scale) - fro) <= TIGHT * fro + 1e-300


def test_core_svd_literal_case() -> None:
    """ΔW = 2·[[1, 0], [0, 0.5], [0, 0]]: σ = (2, 1), exactly; it changes something (B ≠ 0, σ ≠ 0)."""
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    a = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    u, sigma, vh = factored.core_svd(b, a, 2.0)
    assert torch.allclose(sigma, torch.tensor([2.0, 1.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(u * sigma @ vh, torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_zero_rank_factors_give_an_empty_spectrum() -> None:
    u, sigma, vh = factored.core_svd(torch.zeros(5, 0), torch.zeros(0, 3), 1.0)
    assert u.shape == (5, 0) and sigma.shape == (0,) and vh.shape == (0, 3)
    assert factored.module_row("m", 0, sigma, 0) == factored.ModuleRow("m", 0, 0, 1.0, 0.0)


# --- resize -------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(case=factors())
def test_resize_to_full_rank_reproduces_the_delta(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    b, a, scale = case
    delta = dense(b, a, scale)
    out = factored.resize(b, a, scale, b.shape[1])
    assert torch.allclose(out.b @ out.a, delta, rtol=0, atol=TIGHT * spectral(delta) + 1e-300)


@settings(max_examples=150, deadline=None)
@given(case=factors(), data=st.data())
def test_truncation_error_is_the_eckart_young_optimum(
    case: tuple[torch.Tensor, torch.Tensor, float], data: st.DataObject
) -> None:
    b, a, scale = case
    delta = dense(b, a, scale)
    full = torch.linalg.svdvals(delta)  # every singular value of the dense ΔW, fp64
    rank = data.draw(st.integers(0, max(b.shape[1], 1)))
    out = factored.resize(b, a, scale, rank)
    error = float(torch.linalg.matrix_norm(delta - out.b @ out.a).item())
    optimum = float(full[rank:].square().sum().sqrt().item())
    norm = float(torch.linalg.matrix_norm(delta).item())
    assert error <= 1.0001 * optimum + TIGHT * norm + 1e-300
    row = factored.module_row("m", b.shape[1], out.sigma, rank)
    assert abs(row.error * norm - optimum) <= TIGHT * norm + 1e-300  # the table's error is the measured one
    if optimum > 1e-6 * norm:  # it changed something: the truncation really dropped energy
        assert not torch.allclose(out.b @ out.a, delta)


@settings(max_examples=150, deadline=None)
@given(
    case=factors(),
    rule=st.one_of(
        st.builds(SpectrumRule, st.just("rank"), st.integers(1, 12).map(float)),
        st.builds(SpectrumRule, st.sampled_from(["energy", "fro"]), st.floats(0.05, 0.999)),
        st.builds(SpectrumRule, st.just("ratio"), st.floats(1, 1e6)),
    ),
)
def test_every_resize_rule_keeps_its_rank_at_the_optimal_error(
    case: tuple[torch.Tensor, torch.Tensor, float], rule: SpectrumRule
) -> None:
    """The rank a rule picks on our spectrum is the rule recomputed on the dense fp64 svdvals, and the
    resized factors' error is the Eckart–Young optimum at that rank."""
    b, a, scale = case
    delta = dense(b, a, scale)
    full = torch.linalg.svdvals(delta)
    u, sigma, vh = factored.core_svd(b, a, scale, keep=lambda s: choose_rank(s, rule, min_rank=1))
    k = u.shape[1]
    assert k == min(max(by_definition(full.tolist(), rule.kind, rule.value), 1), len(sigma))
    out = factored.truncate(u, sigma, vh, k)
    error = float(torch.linalg.matrix_norm(delta - out.b @ out.a).item())
    optimum = float(full[k:].square().sum().sqrt().item())
    assert error <= 1.0001 * optimum + TIGHT * float(torch.linalg.matrix_norm(delta).item()) + 1e-300


def test_module_row_literal() -> None:
    """σ = (4, 3): ‖ΔW‖² = 25; rank 1 keeps 16/25 and leaves 3/5 of the norm."""
    row = factored.module_row("q", 8, torch.tensor([4.0, 3.0], dtype=torch.float64), 1)
    assert row == factored.ModuleRow("q", 8, 1, 16 / 25, 3 / 5)


# --- stacking: combine, negate, average ---------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(case=factors())
def test_combine_of_one_adapter_at_weight_one_is_the_adapter(case: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    b, a, scale = case
    b_star, a_star = factored.stack([(b, a, 1.0 * scale)])
    delta = dense(b, a, scale)
    assert torch.allclose(b_star @ a_star, delta, rtol=0, atol=TIGHT * spectral(delta) + 1e-300)
    assert b_star.shape == b.shape and a_star.shape == a.shape


@settings(max_examples=100, deadline=None)
@given(case=factors(), weight=st.floats(0.1, 10))
def test_adapter_at_w_plus_adapter_at_minus_w_is_zero(
    case: tuple[torch.Tensor, torch.Tensor, float], weight: float
) -> None:
    b, a, scale = case
    b_star, a_star = factored.stack([(b, a, weight * scale), (b, a, -weight * scale)])
    size = weight * spectral(dense(b, a, scale))
    sigma = factored.spectrum(b_star, a_star, 1.0)
    assert (sigma <= TIGHT * size + 1e-300).all()
    assert factored.frobenius(b_star, a_star, 1.0) <= TIGHT * size * 8 + 1e-300
    one = factored.spectrum(*factored.stack([(b, a, weight * scale)]), 1.0)  # guard: each half is not zero
    assert size == 0 or one[0] > 0.5 * size


@st.composite
def clients(draw: st.DrawFn) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float]], list[float]]:
    """2-12 clients of one module with their own ranks and scales, and weights (some negative)."""
    m, n = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    count = draw(st.integers(2, 12))
    terms = [draw(factors(rows=m, columns=n, rank=draw(st.integers(1, 5)))) for _ in range(count)]
    weights = [draw(st.floats(-2, 2)) for _ in range(count)]
    return terms, weights


@settings(max_examples=120, deadline=None)
@given(case=clients())
def test_stacked_sum_is_the_exact_weighted_sum(
    case: tuple[list[tuple[torch.Tensor, torch.Tensor, float]], list[float]],
) -> None:
    """Streamed one client at a time, re-compressed past saturation (small m, n), equal to Σ wᵢsᵢBᵢAᵢ."""
    terms, weights = case
    m, n = terms[0][0].shape[0], terms[0][1].shape[1]
    expected = sum(w * dense(b, a, s) for (b, a, s), w in zip(terms, weights, strict=True))
    assert isinstance(expected, torch.Tensor)
    acc = StackedSum(m, n, capacity=2)
    for (b, a, s), w in zip(terms, weights, strict=True):
        acc.add(b, a, w * s)
        assert acc.stacked_rank <= 2 * min(m, n) + b.shape[1]
    u, sigma, vh = acc.svd()
    size = sum(abs(w) * spectral(dense(b, a, s)) for (b, a, s), w in zip(terms, weights, strict=True))
    assert torch.allclose(u * sigma @ vh, expected, rtol=0, atol=TIGHT * size + 1e-300)
    b_star, a_star = factored.stack([(b, a, w * s) for (b, a, s), w in zip(terms, weights, strict=True)])
    assert torch.allclose(b_star @ a_star, expected, rtol=0, atol=TIGHT * size + 1e-300)
    fro = float(torch.linalg.matrix_norm(expected).item())
    assert abs(acc.frobenius() - fro) <= TIGHT * size * 8 + 1e-300


@settings(max_examples=120, deadline=None)
@given(case=clients(), keep=st.integers(1, 12), bf16=st.booleans())
def test_truncated_sum_is_the_optimum_whatever_the_orientation(
    case: tuple[list[tuple[torch.Tensor, torch.Tensor, float]], list[float]], keep: int, bf16: bool
) -> None:
    """The command's route (`truncated`: in-place QR of the smaller side, TSQR of the larger held as given, the
    larger side's vectors from ΔW·V): m > n and m < n alike, bf16 or fp32 factors, past saturation too; the
    product is the Eckart–Young optimum of the exact sum and σ is its spectrum."""
    terms, weights = case
    if bf16:  # the larger side is kept in its own dtype: the exact sum is the one of the bf16 values
        terms = [(b.bfloat16(), a.bfloat16(), s) for b, a, s in terms]
    m, n = terms[0][0].shape[0], terms[0][1].shape[1]
    expected = sum(w * dense(b, a, s) for (b, a, s), w in zip(terms, weights, strict=True))
    assert isinstance(expected, torch.Tensor)
    acc = StackedSum(m, n, capacity=3)
    for (b, a, s), w in zip(terms, weights, strict=True):
        acc.add(b, a, w * s)
    result, naive = acc.truncated(keep)
    sigma = torch.linalg.svdvals(expected)
    size = sum(abs(w) * spectral(dense(b, a, s)) for (b, a, s), w in zip(terms, weights, strict=True))
    k = min(keep, len(result.sigma))
    assert result.b.shape == (m, k) and result.a.shape == (k, n) and naive != naive  # nan: no naive term
    optimum = float(sigma[k:].square().sum().sqrt())
    assert float(torch.linalg.matrix_norm(result.b @ result.a - expected)) <= optimum + TIGHT * size * 8 + 1e-300
    assert torch.allclose(result.sigma, sigma[: len(result.sigma)], rtol=0, atol=TIGHT * size + 1e-300)
    assert acc.stacked_rank == 0  # consumed


@settings(max_examples=60, deadline=None)
@given(case=factors(rank=4), count=st.integers(1, 9), data=st.data())
def test_federated_mean_of_identical_clients_is_that_client(
    case: tuple[torch.Tensor, torch.Tensor, float], count: int, data: st.DataObject
) -> None:
    b, a, scale = case
    raw = [data.draw(st.floats(0.5, 100)) for _ in range(count)]  # e.g. sample counts
    weights = [w / sum(raw) for w in raw]  # --mean
    acc = StackedSum(b.shape[0], a.shape[1])
    for w in weights:
        acc.add(b, a, w * scale)
    u, sigma, vh = acc.svd()
    delta = dense(b, a, scale)
    recompressed = factored.truncate(u, sigma, vh, 4)
    atol = TIGHT * count * spectral(delta) + 1e-300
    assert torch.allclose(recompressed.b @ recompressed.a, delta, rtol=0, atol=atol)
    assert fedit_error([(b, a, scale)] * count, weights) <= TIGHT * count * 8  # FedIT is exact here


def test_fedit_error_of_different_clients_matches_the_dense_one() -> None:
    generator = torch.Generator().manual_seed(3)
    terms = [(torch.randn(9, 3, generator=generator), torch.randn(3, 7, generator=generator), 0.5) for _ in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    exact = sum(w * dense(b, a, s) for (b, a, s), w in zip(terms, weights, strict=True))
    b_mean = sum(w * s * b.double() for (b, _, s), w in zip(terms, weights, strict=True))
    a_mean = sum(w * a.double() for (_, a, _), w in zip(terms, weights, strict=True))
    assert isinstance(exact, torch.Tensor) and isinstance(b_mean, torch.Tensor) and isinstance(a_mean, torch.Tensor)
    expected = float((torch.linalg.matrix_norm(b_mean @ a_mean - exact) / torch.linalg.matrix_norm(exact)).item())
    got = fedit_error(terms, weights)
    assert got > 0.5  # FedIT is far off for unrelated clients: the quantity is worth reporting
    assert abs(got - expected) <= TIGHT * 64
    acc = StackedSum(9, 7)
    for (b, a, s), w in zip(terms, weights, strict=True):
        acc.add(b, a, w * s)
    assert naive_relative_error(acc, b_mean, a_mean) == pytest.approx(got, abs=TIGHT * 64)
    assert acc.stacked_rank == 12  # the naive term did not enter the sum
    fro = float(torch.linalg.matrix_norm(exact).item())
    assert abs(acc.frobenius() - fro) <= TIGHT * 64 * fro
    # The command's route: the same number from the one in-place QR that also truncates the sum.
    result, naive = acc.truncated(3, naive=(b_mean, a_mean))
    assert naive == pytest.approx(got, abs=TIGHT * 64)
    optimum = float(torch.linalg.svdvals(exact)[3:].square().sum().sqrt())
    assert float(torch.linalg.matrix_norm(result.b @ result.a - exact)) <= optimum * (1 + 1e-12) + TIGHT * fro


def test_terms_of_other_shapes_are_refused() -> None:
    with pytest.raises(MismatchError, match=r"does not fit the \(4, 3\)"):
        factored.stack([(torch.ones(4, 2), torch.ones(2, 3), 1.0), (torch.ones(5, 2), torch.ones(2, 3), 1.0)])
    with pytest.raises(MismatchError, match="nothing to stack"):
        factored.stack([])
    acc = StackedSum(4, 3)
    with pytest.raises(MismatchError, match=r"does not fit the \(4, 3\) sum"):
        acc.add(torch.ones(4, 2), torch.ones(2, 5), 1.0)
    with pytest.raises(MismatchError, match="rank 2 but its A has rank 1"):
        acc.add(torch.ones(4, 2), torch.ones(1, 3), 1.0)
    assert acc.stacked_rank == 0


# --- oracle: PEFT's own cat combination ---------------------------------------------------------------------


@pytest.mark.oracle
def test_stack_equals_peft_cat_per_module() -> None:
    """add_weighted_adapter(combination_type="cat") on a tiny seeded Llama: its ΔW of every module is ours."""
    from builders import LLAMA, PROJECTIONS
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    first = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False)
    second = LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=PROJECTIONS, init_lora_weights=False)
    peft_model = get_peft_model(model, first, adapter_name="one")
    peft_model.add_adapter("two", second)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    weights = [0.7, -1.3]
    peft_model.add_weighted_adapter(["one", "two"], weights, "cat", combination_type="cat")
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * len(PROJECTIONS)
    for layer in layers:
        terms = [
            (layer.lora_B[name].weight.detach(), layer.lora_A[name].weight.detach(), w * layer.scaling[name])
            for name, w in zip(["one", "two"], weights, strict=True)
        ]
        b_star, a_star = factored.stack(terms)
        expected = layer.get_delta_weight("cat").detach().double()  # PEFT, fp32
        assert expected.abs().max() > 1e-3  # B ≠ 0: the oracle is not comparing zeros
        assert torch.allclose(b_star @ a_star, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        assert not torch.allclose(b_star @ a_star, layer.get_delta_weight("one").double(), atol=1e-4)
