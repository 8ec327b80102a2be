"""Exact lowerings (lowering.py): the lowered adapter's ΔW is the original's, with PEFT as the oracle
(PeftModel.from_pretrained of the lowered adapter gives the original's logits)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import logits, save_adapter, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorasurgeon import lowering, runtimes
from lorasurgeon.adapter_facts import AdapterFacts, ModuleFacts
from lorasurgeon.errors import UnsupportedError

pytestmark = pytest.mark.oracle
TOKENS = torch.arange(32).reshape(4, 8)
PATTERN = {"layers.0.self_attn.q_proj": 8, "layers.1.mlp.down_proj": 2, "layers.0.mlp.up_proj": 6}


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def read(adapter: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((adapter / "adapter_config.json").read_text()), load_file(adapter / "adapter_model.safetensors")


def write(path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors")
    return path


def facts_of(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> AdapterFacts:
    """AdapterFacts of a plain PEFT LoRA (linear modules), with PEFT's pattern rule for alpha."""
    import re

    modules = []
    for key, a in sorted(tensors.items()):
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            keys = [k for k in config.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({k})$", path)]
            alpha = float(config["alpha_pattern"][keys[0]]) if keys else float(config["lora_alpha"])
            rank = a.shape[0]
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            modules.append(ModuleFacts(path, "linear", rank, alpha, scale))
    return AdapterFacts(
        tuple(modules), r=config["r"], lora_alpha=float(config["lora_alpha"]), use_rslora=bool(config.get("use_rslora"))
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("lowering") / "base")


@pytest.mark.parametrize("rslora", [False, True])
def test_padding_the_rank_keeps_the_forward(base: Path, tmp_path: Path, rslora: bool) -> None:
    adapter = save_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, use_rslora=rslora)
    config, tensors = read(adapter)
    padded = {}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            padded[key], padded[b_key] = lowering.pad_rank(tensors[key], tensors[b_key], 16)
    alpha = lowering.padded_alpha(8, 4, 16, rslora)
    assert alpha == (16.0 if rslora else 32.0)
    lowered = write(tmp_path / "padded", {**config, "r": 16, "lora_alpha": alpha}, padded)
    expected = peft_logits(base, adapter)
    assert not torch.allclose(expected, logits(base, tokens=TOKENS), atol=1e-3)
    torch.testing.assert_close(peft_logits(base, lowered), expected, rtol=1e-6, atol=1e-6)


def lower(config: dict[str, Any], tensors: dict[str, torch.Tensor], plan: runtimes.LoweringPlan) -> dict:
    out = {}
    for m in plan.modules:
        prefix = f"base_model.model.{m.path}"
        a, b = lowering.pad_rank(tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"], m.rank)
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, lowering.fold_scale(b, m.factor, 1.0)
    return out


@pytest.mark.parametrize(("runtime", "rslora"), [("llamacpp", False), ("llamacpp", True), ("lorax", True)])
def test_folding_patterns_and_rslora_into_b_keeps_the_forward(
    base: Path, tmp_path: Path, runtime: str, rslora: bool
) -> None:
    alphas = {k: float(2 * v) for k, v in PATTERN.items()}
    adapter = save_adapter(
        base, tmp_path / "lora", r=4, lora_alpha=4, use_rslora=rslora, rank_pattern=PATTERN, alpha_pattern=alphas
    )
    config, tensors = read(adapter)
    facts = facts_of(config, tensors)
    assert runtimes.judge(runtime, facts)  # the adapter as written is read wrong
    plan = runtimes.plan_lowering(runtime, facts)
    new = {**config, "lora_alpha": plan.lora_alpha, "alpha_pattern": {}, "use_rslora": False}
    if plan.uniform:
        new.update(r=plan.rank, rank_pattern={})
    lowered = write(tmp_path / "lowered", new, lower(config, tensors, plan))
    assert runtimes.judge(runtime, facts_of(*read(lowered))) == []
    torch.testing.assert_close(peft_logits(base, lowered), peft_logits(base, adapter), rtol=1e-5, atol=1e-5)


def test_trainable_tokens_become_embedding_lora_rows(base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    indices = [3, 5, 17]
    torch.manual_seed(2)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param) * 0.1)  # trained rows, not the base's
    peft_model.save_pretrained(tmp_path / "tokens")
    saved_config, tensors = read(tmp_path / "tokens")
    (key,) = [k for k in tensors if k.endswith("trainable_tokens_delta")]
    embedding = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    a, b, alpha = lowering.token_rows_to_lora(tensors[key], embedding[indices], indices, embedding.shape[0])
    q_rows = {k: v for k, v in tensors.items() if "token_adapter" not in k}
    rows = {
        **q_rows,
        "base_model.model.model.embed_tokens.lora_embedding_A": a,
        "base_model.model.model.embed_tokens.lora_embedding_B": b,
    }
    new = {**saved_config, "trainable_token_indices": None, "target_modules": ["q_proj", "embed_tokens"]}
    new.update(rank_pattern={"model.embed_tokens": 3}, alpha_pattern={"model.embed_tokens": alpha})
    lowered = write(tmp_path / "lowered", new, rows)
    expected = peft_logits(base, tmp_path / "tokens")
    without = write(tmp_path / "q-only", {**saved_config, "trainable_token_indices": None}, q_rows)
    assert not torch.allclose(peft_logits(base, without), expected, atol=1e-3)  # the rows matter
    torch.testing.assert_close(peft_logits(base, lowered), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal((b @ a).T[indices] + embedding[indices], tensors[key])  # merged rows are the new rows


def test_token_rows_refuse_what_fp32_cannot_hold() -> None:
    new, old = torch.tensor([[1e-30, 2.0]]), torch.tensor([[1.0, 1.0]])  # fp32(1 + (1e-30 − 1)) = 0
    with pytest.raises(UnsupportedError, match="more than fp32 holds exactly"):
        lowering.token_rows_to_lora(new, old, [0], 4)
    with pytest.raises(UnsupportedError, match="distinct rows"):
        lowering.token_rows_to_lora(torch.ones(2, 2), torch.zeros(2, 2), [1, 1], 4)
    a, b, alpha = lowering.token_rows_to_lora(torch.ones(1, 2), torch.zeros(1, 2), [2], 4, layout="linear")
    assert torch.equal(b @ a, torch.tensor([[0.0, 0], [0, 0], [1, 1], [0, 0]])) and alpha == 1.0


def test_fold_rounds_b_once() -> None:
    torch.manual_seed(0)
    b = torch.randn(64, 8).to(torch.bfloat16)
    assert lowering.fold_scale(b, 2.0, 2.0) is b  # factor 1: B bit for bit
    folded = lowering.fold_scale(b, 0.3, 1.0)
    exact = b.double() * 0.3
    assert folded.dtype == torch.bfloat16 and not torch.equal(folded, b)
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # bf16 ulp at c·B
    assert bool(((folded.double() - exact).abs() <= spacing / 2).all())
    with pytest.raises(UnsupportedError):
        lowering.fold_scale(b, 1.0, 0.0)
    with pytest.raises(UnsupportedError, match="cannot pad a rank-8"):
        lowering.pad_rank(torch.ones(8, 4), torch.ones(4, 8), 4)


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_padding_leaves_the_product_bit_for_bit(rank: int, extra: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (rank, 5), generator=generator).float()  # small integers: every sum is exact
    b = torch.randint(-8, 9, (7, rank), generator=generator).float()
    a2, b2 = lowering.pad_rank(a, b, rank + extra)
    assert a2.shape == (rank + extra, 5) and b2.shape == (7, rank + extra)
    assert torch.equal(b2 @ a2, b @ a)
