"""Quantized checkpoints: detection (formats/quantization.py), refusals, and merges in format (requant.py) checked
by transformers' own FP8 loading (it dequantizes on CPU) with PEFT on top, and by compressed-tensors' own
decompression and transformers' compressed-tensors loading.

The FP8 fixtures are the tiny Llama with its projections block-quantized by test_fp8's numpy formula, config as
transformers' FineGrainedFP8Config writes it; the compressed-tensors ones are made by the library's own
compressor (ModelCompressor.compress_model + update_config) on min-max qparams. `merge_lora` runs `lorasurgeon merge`
and returns the survival figures its summary reports per quantized weight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from safetensors.torch import load_file, save_file
from test_fp8 import quantize as reference_quantize
from test_fp8 import torch_q

import lorasurgeon
from lorasurgeon import fp8, requant
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, UnsupportedError
from lorasurgeon.formats.quantization import detect_quantization, gguf_refusal, qlora_warning
from lorasurgeon.header import TensorInfo
from lorasurgeon.quantized import Quantization
from lorasurgeon.quantized_steps import Requantized
from lorasurgeon.read_ahead import ReadAhead
from lorasurgeon.shard_stream import ShardStream

BLOCK = (16, 16)
PROJECTIONS = 2 * 7  # two layers of seven projections
CT_SCHEMES = ["FP8", "FP8_DYNAMIC", "W8A8", "W4A16", "W4A16_ASYM", "FP8_BLOCK"]


def detect(path: Path) -> Quantization:
    with Checkpoint.open(path) as ckpt:
        quant = detect_quantization(ckpt.config, ckpt.tensors, str(path))
    assert quant is not None
    return quant


def write_fp8(base: Path, out: Path, scales_apart: bool = False, scale_dtype: torch.dtype = torch.float32) -> Path:
    """`base` with every projection block-quantized (F8_E4M3 weight + weight_scale_inv in `scale_dtype`: F32 as
    DeepSeek ships them, BF16 as Qwen3's dense FP8 models do); `scales_apart` puts all scales of layer 1 in a
    second shard, away from their weights."""
    from transformers import FineGrainedFP8Config

    stored: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(base).items():
        if name.endswith("_proj.weight"):
            _, fresh = reference_quantize(tensor.double().numpy(), BLOCK)
            scale = torch.from_numpy(fresh).to(scale_dtype)  # rounded to the stored dtype, then divided by
            q, _ = reference_quantize(tensor.double().numpy(), BLOCK, scale.float().numpy())
            stored[name], stored[f"{name}_scale_inv"] = torch_q(q), scale
        else:
            stored[name] = tensor
    out.mkdir(parents=True)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = FineGrainedFP8Config(weight_block_size=BLOCK).to_dict()
    (out / "config.json").write_text(json.dumps(config))
    if not scales_apart:
        save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
        return out
    apart = {n for n in stored if n.startswith("model.layers.1.") and n.endswith("_scale_inv")}
    shards = {
        "model-00001-of-00002.safetensors": sorted(stored.keys() - apart),
        "model-00002-of-00002.safetensors": sorted(apart),
    }
    for file, names in shards.items():
        save_file({n: stored[n] for n in names}, out / file, metadata={"format": "pt"})
    weight_map = {n: file for file, names in shards.items() for n in names}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    return write_fp8(llama_dir, tmp_path_factory.mktemp("fp8") / "base")


@pytest.fixture(scope="module")
def fp8_bf16_scales_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    return write_fp8(llama_dir, tmp_path_factory.mktemp("fp8-bf16") / "base", scale_dtype=torch.bfloat16)


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / r) · B @ A per base weight, read from a PEFT adapter (plain LoRA, no patterns)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in factors.items():
        if ".lora_A." in key:
            b = factors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[f"{module}.weight"] = (b @ a) * (config["lora_alpha"] / config["r"])
    return out


def merge_lora(base: Path, adapter: Path, out: Path) -> dict[str, Requantized]:
    """`lorasurgeon merge` of a plain LoRA into a quantized base: every targeted weight merged in format, every
    other tensor and config.json copied; returns the per-weight figures of its summary (each weight once)."""
    summary = lorasurgeon.merge(base, [adapter], out)
    figures = {figure.tensor: figure for figure in summary.requantized}
    assert len(figures) == len(summary.requantized) == len(deltas(adapter)) and summary.plan.quantization
    return figures


def test_detects_fp8_block_checkpoint(fp8_dir: Path) -> None:
    quant = detect(fp8_dir)
    assert (quant.method, quant.label, quant.refusal, quant.warnings) == (
        "fp8-block", "FP8 e4m3 with 16×16 block scales", None, ()
    )  # fmt: skip
    assert len(quant.weights) == PROJECTIONS
    weight = quant.weights["model.layers.0.mlp.up_proj.weight"]
    assert weight.parts == {"weight": weight.name, "weight_scale_inv": f"{weight.name}_scale_inv"}
    assert (weight.shape, weight.block, weight.rewritten) == ((64, 32), BLOCK, ("weight", "weight_scale_inv"))
    assert quant.companions == {f"{n}_scale_inv" for n in quant.weights}


def test_scales_in_another_shard(tmp_path: Path, llama_dir: Path, fp8_dir: Path, llama_adapter: Path) -> None:
    sharded = write_fp8(llama_dir, tmp_path / "sharded", scales_apart=True)
    quant = detect(sharded)
    with Checkpoint.open(sharded) as ckpt:
        weight = quant.weights["model.layers.1.self_attn.q_proj.weight"]
        assert ckpt.tensors[weight.parts["weight"]].path != ckpt.tensors[weight.parts["weight_scale_inv"]].path
    merge_lora(sharded, llama_adapter, tmp_path / "a")
    merge_lora(fp8_dir, llama_adapter, tmp_path / "b")
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(  # codes and scales alike, wherever each was written
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


def test_fp8_codes_are_written_ahead_at_their_place(
    tmp_path: Path, fp8_dir: Path, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_file stores the F32 scales before the F8 weights, so the scale's step computes the merge: the weight's
    codes are written then, at their offset (never held till their turn), and the file is the in-order one. Each
    weight's parts but the first one's were read ahead, while the weight before it was merged."""
    ahead: list[str] = []
    read: list[bool] = []
    write_ahead, take_parts = ShardStream.write_ahead, ReadAhead.take_parts
    monkeypatch.setattr(ShardStream, "write_ahead", lambda s, n, t: (ahead.append(n), write_ahead(s, n, t))[1])
    monkeypatch.setattr(ReadAhead, "take_parts", lambda s, step: read.append(bool(p := take_parts(s, step))) or p)
    figures = merge_lora(fp8_dir, llama_adapter, tmp_path / "ahead")
    assert sorted(ahead) == sorted(figures) and read == [False] + [True] * (len(figures) - 1)
    monkeypatch.setattr(ShardStream, "later", lambda s, n: False)  # nothing written ahead: kept, written in order
    merge_lora(fp8_dir, llama_adapter, tmp_path / "in-order")
    assert len(ahead) == len(figures)
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "ahead" / file).read_bytes() == (tmp_path / "in-order" / file).read_bytes()


@pytest.mark.parametrize("base", ["fp8_dir", "fp8_bf16_scales_dir"])
def test_fp8_merge_in_format_gives_peft_on_transformers_dequantized_base(
    tmp_path: Path, base: str, llama_adapter: Path, request: pytest.FixtureRequest
) -> None:
    """The oracle chain: transformers loads BASE and OUT dequantized (on CPU); PEFT merges the adapter into the
    loaded BASE. OUT's weights are deq(q', s') bit for bit, differ from PEFT's W + ΔW by exactly the reported
    `error`, moved from W by the reported `survival`; and OUT's logits are much closer to PEFT's than BASE's."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    fp8_dir: Path = request.getfixturevalue(base)

    results = merge_lora(fp8_dir, llama_adapter, tmp_path / "out")
    tokens = torch.arange(16).reshape(2, 8)
    base_model = LlamaForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    with torch.no_grad():
        before = base_model(tokens).logits
        peft_model = PeftModel.from_pretrained(base_model, llama_adapter).eval()
        want = peft_model(tokens).logits
    merged = peft_model.merge_and_unload().state_dict()
    out_model = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    loaded, stored, original = out_model.state_dict(), read_tensors(tmp_path / "out"), read_tensors(fp8_dir)
    for name, result in results.items():
        scale = stored[f"{name}_scale_inv"]
        assert scale.dtype == original[f"{name}_scale_inv"].dtype
        assert torch.equal(loaded[name], fp8.dequantize_blocks(stored[name], scale, BLOCK))
        delta = (merged[name] - base[name]).double()
        assert result.survival == pytest.approx(
            float((loaded[name] - base[name]).double().norm() / delta.norm()), rel=1e-4
        )
        assert result.error == pytest.approx(
            float((loaded[name] - merged[name]).double().norm() / delta.norm()), rel=1e-4
        )
        assert result.error < 0.2 and not result.lost and not torch.equal(loaded[name], base[name]), name
    with torch.no_grad():
        got = out_model(tokens).logits
    # Linearised, the logits move by Σ J·ΔW and miss by Σ J·(D − ΔW), each ‖D − ΔW‖ = error · ‖ΔW‖.
    worst = max(result.error for result in results.values())
    assert (got - want).norm() <= worst * (before - want).norm()


def test_dequantized_route_is_transformers_bf16_loading(fp8_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16).state_dict()
    quant, tensors = detect(fp8_dir), read_tensors(fp8_dir)
    for name, weight in quant.weights.items():
        parts = {k: tensors[v] for k, v in weight.parts.items()}
        assert torch.equal(requant.dequantize(weight, parts, None, torch.bfloat16, str(fp8_dir)), loaded[name]), name


def infos(entries: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, d, s, Path("model.safetensors"), 0, 0, 0) for n, (d, s) in entries.items()}


FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}}
GOOD = {"m.weight": ("F8_E4M3", (40, 32)), "m.weight_scale_inv": ("F32", (3, 2))}


@pytest.mark.parametrize(
    ("tensors", "config", "match"),
    [
        ({"m.weight": ("F8_E4M3", (40, 32))}, FP8_CONFIG, "'m.weight' has no scale tensor 'm.weight_scale_inv'"),
        ({**GOOD, "m.weight_scale_inv": ("F32", (2, 2))}, FP8_CONFIG, r"has shape \[2, 2\] .* needs \[3, 2\]"),
        ({**GOOD, "n.weight_scale_inv": ("F32", (1, 1))}, FP8_CONFIG, "scale 'n.weight_scale_inv' has no FP8 weight"),
        (GOOD, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16]}}, "two positive integers"),
    ],
)  # fmt: skip
def test_fp8_inconsistencies_are_named(tensors: dict[str, Any], config: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        detect_quantization(config, infos(tensors), "ckpt")


@pytest.mark.parametrize(
    ("tensors", "config", "match"),
    [
        ({**GOOD, "m.weight_scale_inv": ("U8", (3, 2))}, FP8_CONFIG, "has 1-byte (e8m0) scales"),
        (GOOD, {"quantization_config": {"quant_method": "fp8", "scale_fmt": "e5m2"}}, "scale_fmt 'e5m2'"),
        (GOOD, {"quantization_config": {"quant_method": "fp8", "expert_dtype": "fp4"}}, "expert_dtype 'fp4'"),
    ],
)
def test_fp8_variants_we_do_not_write_are_refused(tensors: dict[str, Any], config: dict[str, Any], match: str) -> None:
    quant = detect_quantization(config, infos(tensors), "ckpt")
    assert quant is not None and not quant.weights and match in str(quant.refusal)


def test_fused_fp8_experts_are_one_weight_each() -> None:
    """transformers v5 FP8Experts tensors (E, out, in) with an (E, ⌈out/bm⌉, ⌈in/bn⌉) `*_scale_inv` sibling."""
    experts = {
        "model.layers.3.mlp.experts.gate_up_proj": ("F8_E4M3", (8, 256, 128)),
        "model.layers.3.mlp.experts.gate_up_proj_scale_inv": ("F32", (8, 2, 1)),
        "model.layers.3.mlp.experts.down_proj": ("F8_E4M3", (8, 128, 128)),
        "model.layers.3.mlp.experts.down_proj_scale_inv": ("F32", (8, 1, 1)),
    }
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    quant = detect_quantization(config, infos(experts), "c")
    assert quant is not None and quant.refusal is None
    weight = quant.weights["model.layers.3.mlp.experts.gate_up_proj"]
    assert weight.shape == (8, 256, 128) and weight.parts["weight_scale_inv"].endswith("gate_up_proj_scale_inv")


def test_block_size_inferred_without_config(fp8_dir: Path) -> None:
    with Checkpoint.open(fp8_dir / "model.safetensors") as ckpt:  # a lone file: no config.json is read
        assert ckpt.config is None
        quant = detect_quantization(None, ckpt.tensors, "model.safetensors")
    assert quant is not None and quant.refusal is None and {w.block for w in quant.weights.values()} == {BLOCK}
    open_ended = detect_quantization(
        None, infos({"m.weight": ("F8_E4M3", (100, 100)), "m.weight_scale_inv": ("F32", (1, 2))}), "f"
    )
    assert open_ended is not None and "no config.json says the block size" in str(open_ended.refusal)
    per_tensor = detect_quantization(
        None, infos({"m.weight": ("F8_E4M3", (10, 7)), "m.weight_scale_inv": ("F32", ())}), "f"
    )
    assert per_tensor is not None and per_tensor.weights["m.weight"].block == (10, 7) and per_tensor.refusal is None


def transformers_config(kind: str) -> dict[str, Any]:
    from transformers import AwqConfig, BitsAndBytesConfig, GPTQConfig, Mxfp4Config

    made = {
        "bnb4": lambda: BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
        "bnb8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "gptq": lambda: GPTQConfig(bits=4, group_size=128),
        "awq": lambda: AwqConfig(bits=4, group_size=128),
        "mxfp4": lambda: Mxfp4Config(),
    }
    if kind == "hqq":  # HqqConfig needs the hqq package; this is what it writes
        return {"quant_method": "hqq", "quant_config": {"nbits": 4, "group_size": 64}, "skip_modules": ["lm_head"]}
    return json.loads(json.dumps(made[kind]().to_dict()))  # type: ignore[no-untyped-call]  # as config.json holds it


Q = "model.layers.0.self_attn.q_proj"
PACKED = {
    "bnb4": {f"{Q}.weight": ("U8", (512, 1)), f"{Q}.weight.absmax": ("F32", (16,)),
             f"{Q}.weight.quant_map": ("F32", (16,)), f"{Q}.weight.quant_state.bitsandbytes__nf4": ("U8", (100,))},
    "bnb8": {f"{Q}.weight": ("I8", (32, 32)), f"{Q}.SCB": ("F32", (32,))},
    "gptq": {f"{Q}.qweight": ("I32", (4, 32)), f"{Q}.qzeros": ("I32", (1, 4)), f"{Q}.scales": ("F16", (1, 32)),
             f"{Q}.g_idx": ("I32", (32,))},
    "awq": {f"{Q}.qweight": ("I32", (32, 4)), f"{Q}.qzeros": ("I32", (1, 4)), f"{Q}.scales": ("F16", (1, 32))},
    "hqq": {f"{Q}.W_q": ("U8", (256, 4)), f"{Q}.scale": ("F16", (256, 1)), f"{Q}.zero": ("F16", (256, 1))},
    "mxfp4": {"model.layers.0.mlp.experts.gate_up_proj_blocks": ("U8", (4, 128, 2, 16)),
              "model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", (4, 128, 2))},
}  # fmt: skip
LABELS = {
    "bnb4": "bitsandbytes 4-bit",
    "bnb8": "bitsandbytes 8-bit",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "hqq": "HQQ",
    "mxfp4": "MXFP4",
}
BY_NAMES = {
    "bnb4": "bitsandbytes 4-bit",
    "bnb8": "bitsandbytes 8-bit",
    "gptq": "GPTQ",
    "awq": "GPTQ/AWQ-style",
    "hqq": "HQQ",
    "mxfp4": "MXFP4",
}


@pytest.mark.parametrize("kind", sorted(PACKED))
def test_packed_methods_are_refused_by_name(kind: str) -> None:
    tensors = infos({**PACKED[kind], "model.embed_tokens.weight": ("BF16", (128, 32))})
    for config, label in (({"quantization_config": transformers_config(kind)}, LABELS[kind]), (None, BY_NAMES[kind])):
        quant = detect_quantization(config, tensors, "ckpt/config.json")
        assert quant is not None and not quant.weights, kind
        assert quant.refusal is not None and quant.refusal.startswith(f"ckpt/config.json: is quantized with {label}")
        assert "merge into the original 16-bit model" in quant.refusal
        assert "model.embed_tokens.weight" not in quant.companions and quant.companions


def test_other_refusals() -> None:
    unknown = detect_quantization({"quantization_config": {"quant_method": "magic"}}, {}, "c")
    assert unknown is not None and "an unknown method (quantization_config.quant_method 'magic')" in str(
        unknown.refusal
    )
    assert "does not read" in str(gguf_refusal("model.gguf")) and "llama.cpp --lora" in str(gguf_refusal("x.gguf"))
    assert "Mxfp4Config(dequantize=True)" in str(detect_quantization(None, infos(PACKED["mxfp4"]), "c").refusal)  # type: ignore[union-attr]
    plain = infos({"m.weight": ("F8_E4M3", (4, 4)), "n.weight": ("BF16", (4, 4))})
    with pytest.raises(InputError, match="no scale tensor"):  # fp8 weights with no scale in an fp8 checkpoint
        detect_quantization({"quantization_config": {"quant_method": "fp8"}}, plain, "c")
    assert detect_quantization(None, plain, "c") is None  # a plain fp8 cast (ComfyUI fp8_e4m3fn) is a dtype
    with pytest.raises(InputError, match="must be an object"):
        detect_quantization({"quantization_config": "fp8"}, {}, "c")


def test_qlora_warning() -> None:
    """PEFT records no quantization in adapter_config.json; the README of PEFT < 0.7 and unsloth's names do."""
    readme = (
        "## Training procedure\n\nThe following `bitsandbytes` quantization config was used during training:\n"
        "- load_in_4bit: True\n"
    )
    assert "README.md records" in str(
        qlora_warning({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, readme, "a")
    )
    warning = qlora_warning({"base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"}, None, "adapter")
    assert warning is not None and warning.startswith("adapter: trained against a quantized base")
    assert qlora_warning({"base_model_name_or_path": "TheBloke/Llama-2-7B-GPTQ"}, None, "a") is not None
    assert qlora_warning({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, "# card", "a") is None


def test_check_warns_about_a_qlora_adapter(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check (and merge) into the 16-bit base says when the adapter's config or README records a quantized base;
    the merge itself goes ahead."""
    from builders import run_cli

    adapter = tmp_path / "qlora"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"})
    )
    code, _, err = run_cli(["check", str(llama_dir), str(adapter)], capsys)
    assert code == 0 and "trained against a quantized base" in err and "bnb-4bit" in err
    code, _, err = run_cli(["check", str(llama_dir), str(llama_adapter)], capsys)
    assert code == 0 and "quantized base" not in err  # guard: the plain adapter gets no such warning


def test_peft_writes_no_quantization_into_an_adapter(llama_adapter: Path) -> None:
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    assert not [k for k in config if "quant" in k.lower()]


# --- compressed-tensors --------------------------------------------------------------------------------------


def write_compressed(base: Path, out: Path, preset: str) -> Path:
    """`base` quantized with a compressed-tensors preset scheme (groups and blocks of 16 for the tiny model),
    min-max qparams by the library's calculate_qparams, compressed and saved by the library."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import LlamaForCausalLM

    from lorasurgeon.compressed import _reduce

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.group_size:
        scheme.weights.group_size = 16
    if scheme.weights.block_structure:
        scheme.weights.block_structure, scheme.input_activations.group_size = [16, 16], 16
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN
    )
    apply_quantization_config(model, config, show_progress=False)
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            args = module.quantization_scheme.weights
            w = module.weight.data
            scale, zero_point = calculate_qparams(_reduce(w, args, "amin"), _reduce(w, args, "amax"), args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
            if hasattr(module, "input_scale"):
                module.input_scale.data.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module", params=CT_SCHEMES)
def ct_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    pytest.importorskip("compressed_tensors")  # the optional extra lorasurgeon[quant]
    return write_compressed(llama_dir, tmp_path_factory.mktemp("ct") / request.param, request.param)


def test_compressed_tensors_merge_checked_by_the_library(tmp_path: Path, ct_dir: Path, llama_adapter: Path) -> None:
    """OUT decompressed by compressed-tensors' own CompressedTensorsDequantizer and loaded by transformers
    (CompressedTensorsConfig(dequantize=True)): the figures we report hold for its weights, every targeted weight
    changed, and the scale choice is never worse than fresh min-max qparams for the whole tensor."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from transformers import CompressedTensorsConfig, LlamaForCausalLM

    from lorasurgeon import compressed

    quant = detect(ct_dir)
    assert quant.refusal is None and len(quant.weights) == PROJECTIONS and quant.companions
    results = merge_lora(ct_dir, llama_adapter, tmp_path / "out")

    def library(path: Path) -> dict[str, torch.Tensor]:
        # Its name matching takes every `.weight` for a "Linear" target; embeddings have to be ignored by name.
        return CompressedTensorsDequantizer(path, ignore=["model.embed_tokens"], dtype=torch.float32).process(
            read_tensors(path)
        )

    before, after, delta = library(ct_dir), library(tmp_path / "out"), deltas(llama_adapter)
    config = CompressedTensorsConfig(dequantize=True)
    loaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=config
    ).state_dict()
    tensors = read_tensors(ct_dir)
    for name, result in results.items():
        change, wanted = (after[name] - before[name]).double(), delta[name].double().norm()
        assert result.survival == pytest.approx(float(change.norm() / wanted), rel=1e-4)
        assert result.error == pytest.approx(float((change - delta[name]).norm() / wanted), rel=1e-4)
        assert torch.equal(loaded[name], after[name]) and not torch.equal(after[name], before[name]), name
        weight = quant.weights[name]
        parts = {k: tensors[v] for k, v in weight.parts.items()}
        fresh = compressed.decompress(
            {**parts, **compressed.compress(before[name] + delta[name], weight.scheme, parts, "x")}, weight.scheme, "x"
        )
        assert result.error <= float((fresh - before[name] - delta[name]).double().norm() / wanted) * (1 + 1e-6), name


def test_compressed_tensors_dequantized_route_is_transformers_loading(ct_dir: Path) -> None:
    from transformers import CompressedTensorsConfig, LlamaForCausalLM

    config = CompressedTensorsConfig(dequantize=True)
    loaded = LlamaForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, quantization_config=config).state_dict()
    quant, tensors = detect(ct_dir), read_tensors(ct_dir)
    for name, weight in quant.weights.items():
        parts = {k: tensors[v] for k, v in weight.parts.items()}
        assert torch.equal(requant.dequantize(weight, parts, None, torch.float32, str(ct_dir)), loaded[name]), name


def test_compressed_tensors_zero_delta_keeps_every_byte(ct_dir: Path) -> None:
    quant, tensors = detect(ct_dir), read_tensors(ct_dir)
    weight = quant.weights["model.layers.1.mlp.down_proj.weight"]
    parts = {k: tensors[v] for k, v in weight.parts.items()}
    result = requant.merge_in_format(weight, parts, torch.zeros(weight.shape), "x")
    assert (result.survival, result.error) == (1.0, 0.0)
    for name, tensor in result.tensors.items():
        assert torch.equal(tensor.view(torch.uint8), tensors[name].view(torch.uint8)), name


CT = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
}
W4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 16, "symmetric": True}
PACK = {
    f"{Q}.weight_packed": ("I32", (32, 4)),
    f"{Q}.weight_scale": ("BF16", (32, 2)),
    f"{Q}.weight_shape": ("I64", (2,)),
}


@pytest.mark.parametrize(
    ("groups", "extra", "match"),
    [
        ({"g": {"targets": ["Linear"], "weights": W4, "format": "nvfp4-pack-quantized"}}, {}, "nvfp4-pack-quantized"),
        ({"g": {"targets": ["Linear"], "weights": {**W4, "actorder": "group"}}}, {}, "actorder group"),
        (
            {"g": {"targets": ["Linear"], "weights": W4}},
            {"sparsity_config": {"format": "sparse-24-bitmask"}},
            "sparsity_config",
        ),
        (
            {"g": {"targets": ["Linear"], "weights": W4}},
            {"transform_config": {"config_groups": {"u": {}}}},
            "transform_config",
        ),
        ({"g": {"targets": ["Linear"], "weights": W4}}, {"quantization_status": "frozen"}, "'frozen'"),
    ],
)
def test_compressed_schemes_we_do_not_write_are_refused(
    groups: dict[str, Any], extra: dict[str, Any], match: str
) -> None:
    quant = detect_quantization({"quantization_config": {**CT, "config_groups": groups, **extra}}, infos(PACK), "c")
    assert quant is not None and quant.refusal is not None and match in quant.refusal, quant.refusal


def test_compressed_inconsistencies_are_named() -> None:
    groups = {"g": {"targets": ["Linear"], "weights": {**W4, "symmetric": False}}}
    with pytest.raises(InputError, match=r"stores model\.layers\.0\.self_attn\.q_proj\.weight_zero_point"):
        detect_quantization({"quantization_config": {**CT, "config_groups": groups}}, infos(PACK), "c")
    elsewhere = {"g": {"targets": ["re:.*mlp.*"], "weights": W4}}
    with pytest.raises(InputError, match=r"no module that a config group of config\.json targets"):
        detect_quantization({"quantization_config": {**CT, "config_groups": elsewhere}}, infos(PACK), "c")
    dense = infos({f"{Q}.weight": ("BF16", (32, 32))})
    ignored = detect_quantization(
        {"quantization_config": {**CT, "config_groups": elsewhere, "ignore": [Q]}}, dense, "c"
    )
    assert ignored is not None and not ignored.weights and ignored.refusal is None


def test_compressed_groups_by_most_specific_target_and_inferred_format() -> None:
    """Mixed precision: attention int4 by regex, every other Linear int8 W8A8; no per-group "format", so each is
    inferred as compressed-tensors' infer_module_format does (weight-only int: pack; int with inputs: int)."""
    mlp = "model.layers.0.mlp.down_proj"
    tensors = infos({**PACK, f"{mlp}.weight": ("I8", (32, 64)), f"{mlp}.weight_scale": ("BF16", (32, 1))})
    groups = {
        "all": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}},
        "attention": {"targets": ["re:.*self_attn.*"], "weights": W4},
    }  # fmt: skip
    config = {"quantization_config": {**CT, "format": "mixed-precision", "config_groups": groups}}
    quant = detect_quantization(config, tensors, "c")
    assert quant is not None and quant.refusal is None
    attention, down = quant.weights[f"{Q}.weight"], quant.weights[f"{mlp}.weight"]
    assert (attention.group, attention.scheme and attention.scheme["format"], attention.shape) == (
        "attention", "pack-quantized", (32, 32)
    )  # fmt: skip
    assert (down.group, down.scheme and down.scheme["format"], down.rewritten) == (
        "all", "int-quantized", ("weight", "weight_scale")
    )  # fmt: skip
    assert f"{Q}.weight_packed" in quant.companions and f"{mlp}.weight" not in quant.companions
    nameless = detect_quantization(None, infos(PACK), "c")
    assert nameless is not None and "no config.json quantization_config says" in str(nameless.refusal)


def test_compressed_needs_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasurgeon import compressed

    monkeypatch.setitem(__import__("sys").modules, "compressed_tensors.compressors", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'lorasurgeon\[quant\]'"):
        compressed.decompress({}, {"weights": W4, "format": "pack-quantized"}, "ckpt")


def test_compressed_tensors_dtype_writes_a_dequantized_model(tmp_path: Path, ct_dir: Path, llama_adapter: Path) -> None:
    """--dtype fp32: every compressed module becomes a float `weight` (deq + ΔW, the library's decompression),
    its packed values, scales and zero points are gone, and so is quantization_config; transformers loads OUT
    as a plain model."""
    from transformers import CompressedTensorsConfig, LlamaForCausalLM

    lorasurgeon.merge(ct_dir, [llama_adapter], tmp_path / "out", dtype="fp32")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    ours, quant = read_tensors(tmp_path / "out"), detect(ct_dir)
    assert not [n for n in ours if n.rpartition(".")[2].startswith(("weight_", "input_"))]
    config = CompressedTensorsConfig(dequantize=True)
    before = LlamaForCausalLM.from_pretrained(ct_dir, dtype=torch.float32, quantization_config=config).state_dict()
    for name, delta in deltas(llama_adapter).items():
        assert name in quant.weights and ours[name].dtype == torch.float32
        assert torch.allclose(ours[name], before[name] + delta, rtol=0, atol=1e-6), name
    _, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
