"""Every PEFT layer kind and config field against PEFT's own merge_and_unload() (FORMATS.md §1-§4), and every
refusal by name.

Tolerance: the rule of test_oracle_peft.py (fp32 within 1e-6 of the tensor's max magnitude; bf16 within 1 ulp
of PEFT's fp32 merge rounded once). Adapters are built with init_lora_weights=False and then every other
trainable tensor (DoRA magnitudes, modules_to_save copies, biases, trainable-token rows) is perturbed too, so
a merge that ignored any of them would fail.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import logits, model_class, peft_merged, read_tensors, refused, save_model, tree_hashes
from safetensors.torch import save_file
from test_oracle_peft import assert_matches_peft

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError

pytestmark = pytest.mark.oracle


class ConvNet(torch.nn.Module):
    """A custom model with every conv kind PEFT adapts: Conv1d, Conv2d 1x1 and 3x3, Conv3d, plus Linear."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.seq = torch.nn.Conv1d(8, 12, kernel_size=3, padding=1)
        self.point = torch.nn.Conv2d(12, 16, kernel_size=1)
        self.spatial = torch.nn.Conv2d(16, 16, kernel_size=3, padding=1, groups=groups)
        self.volume = torch.nn.Conv3d(4, 6, kernel_size=(3, 3, 3), padding=1, bias=False)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.seq(self.embed(tokens).transpose(1, 2))  # (n, 12, L)
        x = self.spatial(self.point(x.unsqueeze(-1)))  # (n, 16, L, 1)
        return self.head(x.mean(dim=(2, 3)))


def save_convnet(path: Path, groups: int = 1) -> Path:
    torch.manual_seed(0)
    path.mkdir(parents=True)
    save_file(ConvNet(groups).state_dict(), path / "model.safetensors", metadata={"format": "pt"})
    return path


def load_convnet(path: Path, groups: int = 1) -> ConvNet:
    net = ConvNet(groups)
    net.load_state_dict(read_tensors(path))
    return net


def perturbed_adapter(model: torch.nn.Module, path: Path, seed: int = 1, **lora: Any) -> Path:
    """PEFT's get_peft_model + save_pretrained with every saved tensor moved away from its initial value."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # PEFT warns about tied embeddings and fan_in_fan_out; not under test here
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    param.normal_(0, 0.05)
                elif param.requires_grad and "lora_A" not in name and "lora_embedding_A" not in name:
                    param.add_(torch.randn_like(param) * 0.05)
        peft_model.save_pretrained(path)
    return path


def hf_adapter(base: Path, path: Path, arch: str = "llama", **lora: Any) -> Path:
    return perturbed_adapter(model_class(arch).from_pretrained(base, dtype=torch.float32), path, **lora)


def convnet_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_convnet(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def peft_logits(base: Path, adapter: Path, arch: str, tokens: torch.Tensor) -> torch.Tensor:
    """The adapter's own (unmerged) forward: what a correct merge must reproduce."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_class(arch).from_pretrained(base), adapter).eval()
        with torch.no_grad():
            return model(input_ids=tokens).logits


# --- layer kinds, replacements and trainable tokens: equal to PEFT's merge_and_unload ---------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_embedding_lora_and_modules_to_save(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_model(tmp_path / "base", dtype=dtype)
    adapter = hf_adapter(
        base,
        tmp_path / "lora",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    stored = read_tensors(adapter / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in stored  # a saved embedding, replaced
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in stored
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", base, peft_merged(base, adapter))
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert len(changed) == 6  # 2 layers x (q, v) + embedding + head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_dora_linear_and_embedding(tmp_path: Path, dtype: torch.dtype) -> None:
    llama_dir = save_model(tmp_path / "base", dtype=dtype)
    adapter = hf_adapter(
        llama_dir,
        tmp_path / "dora",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["q_proj", "down_proj", "embed_tokens"],
    )
    summary = lorasurgeon.merge(llama_dir, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", llama_dir, peft_merged(llama_dir, adapter))
    assert len(changed) == 5
    assert {t.module.kind for s in summary.plan.steps for t in s.terms} == {"linear", "embedding"}
    # Guard: DoRA differs from the plain LoRA merge of the same factors.
    plain = hf_adapter(llama_dir, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["q_proj"])
    lorasurgeon.merge(llama_dir, [plain], tmp_path / "plain-out")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(read_tensors(tmp_path / "out")[name], read_tensors(tmp_path / "plain-out")[name])


def test_llama_trainable_tokens(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "tok", r=2, target_modules=["q_proj"], trainable_token_indices=[3, 9, 0])
    lorasurgeon.merge(llama_dir, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", llama_dir, peft_merged(llama_dir, adapter))
    assert "model.embed_tokens.weight" in changed
    ours, base = (
        read_tensors(tmp_path / "out")["model.embed_tokens.weight"],
        read_tensors(llama_dir)["model.embed_tokens.weight"],
    )
    assert torch.equal(ours[[1, 2, 4]], base[[1, 2, 4]]) and not torch.equal(ours[[0, 3, 9]], base[[0, 3, 9]])


@pytest.mark.parametrize(
    "fields",
    [{"use_dora": True}, {"lora_bias": True}, {"bias": "all"}, {"bias": "lora_only", "lora_bias": True}],
    ids=["dora", "lora_bias", "bias-all", "bias-lora-only+lora_bias"],
)
def test_gpt2_conv1d_variants(tmp_path: Path, fields: dict[str, Any]) -> None:
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = hf_adapter(
        base,
        tmp_path / "lora",
        arch="gpt2",
        r=4,
        lora_alpha=8,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj"],
        **fields,
    )
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", base, peft_merged(base, adapter, arch="gpt2"))
    weights = [n for n in changed if n.endswith(".weight")]
    biases = [n for n in changed if n.endswith(".bias")]
    assert len(weights) == 6, changed  # c_attn, attn.c_proj, mlp.c_proj in 2 layers
    if fields.get("bias") == "all":
        assert any("ln_" in n for n in biases)  # non-targeted biases are replaced too
    else:
        assert len(biases) == (0 if "use_dora" in fields else 6), biases


@pytest.mark.parametrize(
    "fields",
    [{"use_rslora": True}, {"use_dora": True}, {"lora_bias": True}],
    ids=["rslora", "dora", "lora_bias"],
)
def test_convnet_conv_kinds(tmp_path: Path, fields: dict[str, Any]) -> None:
    base = save_convnet(tmp_path / "base")
    targets = ["seq", "point", "spatial", "head"] + ([] if fields.get("lora_bias") else ["volume", "embed"])
    adapter = perturbed_adapter(
        load_convnet(base), tmp_path / "lora", r=4, lora_alpha=6, target_modules=targets, **fields
    )
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", base, convnet_merged(base, adapter))
    assert {f"{t}.weight" for t in targets} <= set(changed)
    if fields.get("lora_bias"):
        assert {f"{t}.bias" for t in targets} <= set(changed)
    assert {t.module.kind for s in summary.plan.steps for t in s.terms} >= {"conv", "linear"}


def test_conv_delta_literal() -> None:
    """ΔW of a 3x3 conv LoRA, checked by hand on the (0, 0, :, :) kernel: s · Σ_k B[0,k] A[k,0,:,:]."""
    from lorasurgeon import linalg

    a = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    b = torch.tensor([[1.0, -1.0], [2.0, 0.5]]).reshape(2, 2, 1, 1)
    delta = linalg.conv_delta(a, b, 0.5)
    assert delta.shape == (2, 1, 3, 3)
    assert torch.equal(delta[0, 0], torch.full((3, 3), -4.5))  # 0.5 · (A[0] − A[1]) = 0.5 · (−9)
    assert torch.equal(delta[1, 0, 0], torch.tensor([2.25, 3.5, 4.75]))  # 0.5 · (2·A[0] + 0.5·A[1]), first row


def test_dora_rescale_literal() -> None:
    from lorasurgeon import linalg

    v = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(linalg.dora_rescale(v, torch.tensor([10.0, 1.0]), 0), torch.tensor([[6.0, 8.0], [0.0, 1.0]]))
    assert torch.allclose(
        linalg.dora_rescale(v, torch.tensor([1.0, 1.0]), 1), torch.tensor([[1.0, 0.8944272], [0.0, 0.4472136]])
    )


# --- tied embeddings (FORMATS.md §4.1) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"target_modules": ["c_attn", "wte"]},
        {"target_modules": ["c_attn", "wte"], "shard": "40KB"},
        {"target_modules": ["c_attn", "lm_head"]},
        {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-on-wte", "lora-on-wte-sharded", "lora-on-lm_head", "lm_head-in-modules_to_save"],
)
def test_gpt2_tied_embedding_is_untied(tmp_path: Path, fields: dict[str, Any]) -> None:
    shard = fields.pop("shard", None)
    base = save_model(tmp_path / "base", arch="gpt2", max_shard_size=shard)
    adapter = hf_adapter(base, tmp_path / "lora", arch="gpt2", r=4, lora_alpha=8, **fields)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    out = read_tensors(tmp_path / "out")
    assert "lm_head.weight" in out and "lm_head.weight" not in read_tensors(base)
    assert not torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((base / "config.json").read_text()).get("tie_word_embeddings", True) is True
    assert any("tie_word_embeddings" in w.message for w in summary.plan.warnings)
    if shard:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["transformer.wte.weight"]
    tokens = torch.arange(16).reshape(2, 8)
    got = logits(tmp_path / "out", arch="gpt2", tokens=tokens)
    assert not torch.allclose(got, logits(base, arch="gpt2", tokens=tokens), atol=1e-3)
    torch.testing.assert_close(got, peft_logits(base, adapter, "gpt2", tokens), rtol=1e-5, atol=1e-5)


def test_gpt2_tied_trainable_tokens_stay_tied(tmp_path: Path) -> None:
    """PEFT ties trainable-token rows of a tied embedding to lm_head too: keeping the tie reproduces that."""
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = hf_adapter(
        base, tmp_path / "lora", arch="gpt2", r=2, target_modules=["c_attn"], trainable_token_indices=[2, 5]
    )
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert "lm_head.weight" not in read_tensors(tmp_path / "out")
    tokens = torch.tensor([[2, 5, 7, 1, 2, 9, 5, 0]])
    got = logits(tmp_path / "out", arch="gpt2", tokens=tokens)
    assert not torch.allclose(got, logits(base, arch="gpt2", tokens=tokens), atol=1e-3)
    torch.testing.assert_close(got, peft_logits(base, adapter, "gpt2", tokens), rtol=1e-5, atol=1e-5)


def test_gpt2_tied_untouched_stays_tied(tmp_path: Path) -> None:
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = hf_adapter(base, tmp_path / "lora", arch="gpt2", r=4, target_modules=["c_attn"])
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert "lm_head.weight" not in read_tensors(tmp_path / "out") and not summary.plan.warnings
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()


# --- refusals: each names the tensor (or file) and the reason ---------------------------------------------


def test_refuses_grouped_conv(tmp_path: Path) -> None:
    base = save_convnet(tmp_path / "base", groups=2)
    adapter = perturbed_adapter(load_convnet(base, groups=2), tmp_path / "lora", r=4, target_modules=["spatial"])
    message = refused(base, adapter, tmp_path / "out", r"grouped convolution \(groups=2\)")
    assert "base_model.model.spatial.lora_A.weight -> spatial.weight" in message


def test_refuses_dora_unmerge(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "dora", r=4, use_dora=True, target_modules=["q_proj"])
    message = refused(llama_dir, adapter, tmp_path / "out", "DoRA cannot be unmerged", operation="unmerge")
    assert "q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.weight" in message and "norm" in message


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"modules_to_save": ["lm_head"]}, "base_model.model.lm_head.weight"),
        ({"trainable_token_indices": [1, 2]}, "embed_tokens.token_adapter.trainable_tokens_delta"),
    ],
    ids=["modules_to_save", "trainable_tokens"],
)
def test_refuses_unmerge_of_replacements(tmp_path: Path, llama_dir: Path, fields: dict[str, Any], key: str) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "lora", r=2, target_modules=["q_proj"], **fields)
    message = refused(llama_dir, adapter, tmp_path / "out", "unmerge cannot restore it", operation="unmerge")
    assert key in message


def test_refuses_lora_bias_without_base_bias(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "lb", r=2, lora_bias=True, target_modules=["q_proj"])
    message = refused(llama_dir, adapter, tmp_path / "out", "lora_bias needs a bias in the base layer")
    assert "q_proj.lora_B.bias -> model.layers.0.self_attn.q_proj.weight" in message


def test_refuses_weighted_dora(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "dora", r=2, use_dora=True, target_modules=["v_proj"])
    message = refused(
        llama_dir, adapter, tmp_path / "out", "DoRA module can only be merged with weight 1", weights=[0.5]
    )
    assert "v_proj.lora_A.weight" in message


def test_refuses_resized_replacement(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "lora", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    weights = adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(130, 32)  # a vocabulary resized to 130
    save_file(tensors, weights, metadata={"format": "pt"})
    message = refused(
        llama_dir, adapter, tmp_path / "out", r"has shape \[130, 32\] but the base tensor has \[128, 32\]"
    )
    assert "base_model.model.lm_head.weight -> lm_head.weight" in message


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "lora_ga", "pissa_niter_4", "loftq"])
def test_refuses_adapters_of_a_modified_base(tmp_path: Path, llama_dir: Path, llama_adapter: Path, init: str) -> None:
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((llama_adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    message = refused(llama_dir, adapter, tmp_path / "out", f"init_lora_weights='{init}'")
    assert "adapter_config.json" in message and "modified base" in message


def test_refuses_quantized_base(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    base = tmp_path / "bnb"
    base.mkdir()
    tensors = read_tensors(llama_dir)
    tensors["model.layers.0.mlp.down_proj.weight.absmax"] = torch.ones(4)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text((llama_dir / "config.json").read_text())
    message = refused(base, llama_adapter, tmp_path / "out", r"is quantized with bitsandbytes 4-bit \(NF4/FP4\)")
    assert "model.layers.0.mlp.down_proj.weight.absmax" in message and "original 16-bit model" in message
    config = json.loads((llama_dir / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    save_file(read_tensors(llama_dir), base / "model.safetensors", metadata={"format": "pt"})
    refused(
        base,
        llama_adapter,
        tmp_path / "out",
        r"bnb: is quantized with GPTQ \(quantization_config.quant_method 'gptq'\)",
    )


def test_refuses_magnitude_without_use_dora(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "dora", r=2, use_dora=True, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    refused(
        llama_dir,
        adapter,
        tmp_path / "out",
        r"q_proj has a DoRA magnitude vector but adapter_config.json says use_dora=False",
    )


def test_refuses_dora_beside_another_adapter(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    dora = hf_adapter(llama_dir, tmp_path / "dora", r=2, use_dora=True, target_modules=["q_proj"])
    before = tree_hashes(llama_dir)
    with pytest.raises(LorasurgeonError, match="DoRA module must be the only adapter changing its weight") as error:
        lorasurgeon.merge(llama_dir, [llama_adapter, dora], tmp_path / "out")
    assert "q_proj.lora_A.weight -> model.layers.0.self_attn.q_proj.weight" in str(error.value)
    assert not (tmp_path / "out").exists() and tree_hashes(llama_dir) == before


def test_refuses_two_adapters_replacing_one_tensor(tmp_path: Path, llama_dir: Path) -> None:
    first = hf_adapter(llama_dir, tmp_path / "a", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    second = hf_adapter(llama_dir, tmp_path / "b", seed=2, r=2, target_modules=["v_proj"], modules_to_save=["lm_head"])
    plan = lorasurgeon.check(llama_dir, [first, second])
    (finding,) = plan.errors
    assert (finding.adapter_key, finding.base_key) == ("base_model.model.lm_head.weight", "lm_head.weight")
    assert "another adapter already sets these values" in finding.message


def test_refuses_unmerge_of_replaced_biases(tmp_path: Path) -> None:
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = hf_adapter(base, tmp_path / "lora", arch="gpt2", r=2, target_modules=["c_attn"], bias="lora_only")
    message = refused(base, adapter, tmp_path / "out", "unmerge cannot restore it", operation="unmerge")
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias -> transformer.h.0.attn.c_attn.bias" in message


def test_conv_and_lora_bias_unmerge_restores_the_base(tmp_path: Path) -> None:
    base = save_convnet(tmp_path / "base")
    targets = ["seq", "point", "spatial", "head"]
    adapter = perturbed_adapter(load_convnet(base), tmp_path / "lora", r=4, target_modules=targets, lora_bias=True)
    lorasurgeon.merge(base, [adapter], tmp_path / "merged")
    lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "restored")
    original, merged, restored = (read_tensors(p) for p in (base, tmp_path / "merged", tmp_path / "restored"))
    for name in (f"{t}.{p}" for t in targets for p in ("weight", "bias")):
        assert not torch.equal(merged[name], original[name]), name
        assert (restored[name] - original[name]).abs().max().item() <= 1e-6 * original[name].abs().max().item(), name


def test_refuses_modules_to_save_without_its_tensor(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(llama_dir, tmp_path / "lora", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    weights = adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    del tensors["base_model.model.lm_head.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    message = refused(llama_dir, adapter, tmp_path / "out", "it is in modules_to_save but the adapter holds no tensor")
    assert f"{adapter} -> lm_head.weight" in message


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora_bias"])
def test_cuda_conv_kinds_match_peft(tmp_path: Path, fields: dict[str, Any]) -> None:
    base = save_convnet(tmp_path / "base")
    targets = ["seq", "point", "spatial", "head"] + ([] if fields.get("lora_bias") else ["volume", "embed"])
    adapter = perturbed_adapter(load_convnet(base), tmp_path / "lora", r=4, target_modules=targets, **fields)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out", device="cuda")
    assert summary.device.startswith("cuda")
    assert {f"{t}.weight" for t in targets} <= set(
        assert_matches_peft(tmp_path / "out", base, convnet_merged(base, adapter))
    )


@pytest.mark.gpu
def test_cuda_replacements_and_token_rows_match_peft(tmp_path: Path, llama_dir: Path) -> None:
    adapter = hf_adapter(
        llama_dir,
        tmp_path / "lora",
        r=4,
        target_modules=["q_proj", "lm_head"],
        modules_to_save=["embed_tokens"],
    )
    rows = hf_adapter(llama_dir, tmp_path / "rows", r=2, target_modules=["v_proj"], trainable_token_indices=[4, 8])
    for path in (adapter, rows):
        lorasurgeon.merge(llama_dir, [path], tmp_path / f"{path.name}-out", device="cuda")
        assert assert_matches_peft(tmp_path / f"{path.name}-out", llama_dir, peft_merged(llama_dir, path))
