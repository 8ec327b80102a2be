"""verify's per-tensor verdicts (verdict.py): ulp arithmetic on literal values, crafted merges, and PEFT's own
bf16 merge_and_unload as the merge that must pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import save_adapter, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lorasurgeon import verdict
from lorasurgeon.errors import UnsupportedError


def test_ulp_distances_count_representable_values() -> None:
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    up = torch.tensor([1 + 2**-7], dtype=torch.bfloat16)  # the next bf16 after 1
    assert int(verdict.ulp_distance(up, one)) == 1 and int(verdict.ulp_distance(up * 2, one)) == 129
    tiny = torch.tensor([2.0**-133], dtype=torch.bfloat16)  # the smallest bf16 subnormal
    assert int(verdict.ulp_distance(tiny, -tiny)) == 2
    assert int(verdict.ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0]))) == 0
    assert int(verdict.ulp_distance(torch.tensor([1.0]), torch.tensor([1.0 + 2**-23]))) == 1
    assert int(verdict.ulp_distance(torch.tensor([float("nan")]), torch.tensor([1.0]))) > 2**32
    assert verdict.ulp(torch.tensor([1.0, 3.0, 0.0]), torch.bfloat16).tolist() == [2**-7, 2**-6, 2**-133]
    assert verdict.ulp(torch.tensor([1.0], dtype=torch.float16)).item() == 2**-10
    with pytest.raises(UnsupportedError, match=r"not torch\.float64"):
        verdict.ordered(torch.zeros(1, dtype=torch.float64))


@pytest.fixture
def case() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    base = (torch.randn(64, 48) * 0.02).to(torch.bfloat16)
    delta = torch.randn(64, 8) @ torch.randn(8, 48) * 0.002  # ~30 % of W: many ulps
    return base, delta


def merge(base: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (base.float() + scale * delta).to(base.dtype)


def test_the_merge_itself_is_exact(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, delta = case
    v = verdict.judge_tensor(base, merge(base, delta), delta)
    assert v.kind == "exact" and v.proven and v.scale == pytest.approx(1.0, abs=1e-2)
    assert not torch.equal(merge(base, delta), base)


def test_a_double_rounded_merge_is_within_tolerance(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, delta = case
    peft_like = (base.float() + delta.to(torch.bfloat16).float()).to(torch.bfloat16)  # PEFT's embedding merge
    assert not torch.equal(peft_like, merge(base, delta))
    v = verdict.judge_tensor(base, peft_like, delta)
    assert v.kind == "within tolerance" and v.max_ulps <= 1.0 and v.proven
    assert verdict.judge_tensor(base, peft_like, delta, tolerance=0).kind != "within tolerance"


@pytest.mark.parametrize("scale", [0.5, 0.99, 2.0])
def test_a_merge_at_another_scale_is_a_wrong_scale(case: tuple[torch.Tensor, torch.Tensor], scale: float) -> None:
    base, delta = case
    v = verdict.judge_tensor(base, merge(base, delta, scale), delta)
    assert v.kind == "wrong scale" and not v.proven
    assert v.scale == pytest.approx(scale, rel=1e-2)


def test_a_scale_error_below_one_ulp_is_seen_by_the_fit() -> None:
    torch.manual_seed(1)
    base = (1 + torch.rand(64, 64)).to(torch.bfloat16)  # one binade: ulp 2^-7 everywhere
    delta = torch.randn(64, 64) * 2**-7 * 10  # ~10 ulps: 1 % of it is 0.1 ulp
    off = merge(base, delta, 0.99)
    v = verdict.judge_tensor(base, off, delta)
    assert v.max_ulps <= 1.0 and v.over_tolerance == 0  # no element is over the tolerance...
    assert v.kind == "wrong scale" and v.drift is not None and v.drift > verdict.SCALE_SIGMAS  # ...the fit sees it
    assert verdict.judge_tensor(base, merge(base, delta), delta).kind == "exact"


def test_skipped_foreign_and_unasked_changes(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, delta = case
    assert verdict.judge_tensor(base, base.clone(), delta).kind == "adapter not applied"
    other = torch.randn(64, 8) @ torch.randn(8, 48) * 0.002
    assert verdict.judge_tensor(base, merge(base, other), delta).kind == "mismatch"
    assert verdict.judge_tensor(base, merge(base, delta), None).kind == "changed without an adapter"
    assert verdict.judge_tensor(base, base.clone(), None).kind == "exact"
    assert verdict.judge_tensor(base, base.clone(), torch.zeros(64, 48)).kind == "exact"
    assert verdict.judge_tensor(base, merge(base, delta).float(), delta).kind == "dtype changed"
    assert verdict.judge_tensor(base, merge(base, delta).T, delta).kind == "shape changed"
    nan = merge(base, delta)
    nan[3, 4] = float("nan")
    assert verdict.judge_tensor(base, nan, delta).kind == "mismatch"


def test_blocks_of_rows_give_the_same_verdict(
    case: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, delta = case
    merged = (base.float() + delta.to(torch.bfloat16).float()).to(torch.bfloat16)
    whole = verdict.judge_tensor(base, merged, delta)
    monkeypatch.setattr(verdict, "BLOCK_ELEMENTS", 100)  # 2 rows a block
    blocked = verdict.judge_tensor(base, merged, delta)
    assert blocked.kind == whole.kind and blocked.max_ulps == whole.max_ulps
    assert blocked.scale == pytest.approx(whole.scale) and blocked.drift == pytest.approx(whole.drift)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.sampled_from([1e-3, 1e-1, 10.0]))
def test_rounding_once_or_twice_is_always_proven(seed: int, size: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 24, generator=generator).to(torch.bfloat16)
    delta = torch.randn(16, 24, generator=generator) * size
    assert verdict.judge_tensor(base, merge(base, delta), delta).kind == "exact"
    twice = (base.float() + delta.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert verdict.judge_tensor(base, twice, delta).proven


@pytest.mark.oracle
def test_peft_bf16_merge_and_unload_is_proven(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base_dir = save_model(tmp_path / "base", dtype=torch.bfloat16)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
    adapter = save_adapter(base_dir, tmp_path / "lora", r=4, lora_alpha=8, target_modules=targets)
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(tmp_path / "merged")
    base, merged = load_file(base_dir / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    factors = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in factors.items():
        name = key.removeprefix("base_model.model.")
        if name.endswith(".lora_A.weight"):
            b = factors[key.replace("lora_A", "lora_B")]
            deltas[name.replace(".lora_A.weight", ".weight")] = 2.0 * (b.float() @ a.float())
        elif name.endswith(".lora_embedding_A"):
            b = factors[key.replace("lora_embedding_A", "lora_embedding_B")]
            deltas[name.replace(".lora_embedding_A", ".weight")] = 2.0 * (b.float() @ a.float()).T
    verdicts = {name: verdict.judge_tensor(base[name], merged[name], deltas.get(name)) for name in base}
    assert all(v.proven for v in verdicts.values()), {k: v for k, v in verdicts.items() if not v.proven}
    assert verdicts["model.embed_tokens.weight"].kind == "within tolerance"  # PEFT rounds the embedding ΔW first
    assert sum(v.kind == "exact" and name in deltas for name, v in verdicts.items()) == len(deltas) - 1
    half = {name: merge(base[name], d, 0.5) for name, d in deltas.items()}
    assert {verdict.judge_tensor(base[n], half[n], deltas[n]).kind for n in deltas} == {"wrong scale"}
