"""`lorasurgeon merge` into FP8 block-quantized MoE bases (DeepSeek-V3-style per-expert FP8, fused FP8 experts),
and the dequantizing `--dtype bf16` route.

Oracles: transformers' own FP8 loading (it dequantizes on CPU, and fuses DeepSeek's per-expert tensors) of OUT
and BASE, PEFT's forward and merge on that dequantized BASE; for fused FP8 experts, which transformers' CPU path
does not read, PEFT's ΔW formula written out here (einsum) on the fp32 model. The figures the summary reports
(survival, error) are recomputed from OUT's stored tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from moe_models import moe_config, randomized, save_layout, save_moe_adapter
from safetensors.torch import save_file
from test_oracle_peft import ulp_distance

import lorasurgeon
from lorasurgeon import fp8

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
]
BLOCK = (8, 8)
TOKENS = torch.arange(12).reshape(2, 6)
DEEPSEEK_LORA: dict[str, Any] = {
    "target_modules": ["q_a_proj", "kv_b_proj"],
    "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "shared_experts.up_proj.weight"],
}


def quantized_copy(base: Path, out: Path) -> Path:
    """`base` with every projection and expert matrix whose dims are whole 8×8 blocks FP8-quantized by
    lorasurgeon.fp8 (DeepSeek's formula, tested against its numpy form in test_fp8), config as transformers'
    FineGrainedFP8Config writes it."""
    import transformers as tf

    stored: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(base).items():
        quantize = tensor.dim() >= 2 and ("proj" in name or ".experts." in name) and "embed" not in name
        if quantize and tensor.shape[-1] % BLOCK[1] == 0 and tensor.shape[-2] % BLOCK[0] == 0:
            stored[name], stored[f"{name}_scale_inv"] = fp8.quantize_blocks(tensor.float(), BLOCK)
        else:
            stored[name] = tensor
    out.mkdir(parents=True)
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = tf.FineGrainedFP8Config(weight_block_size=list(BLOCK)).to_dict()
    (out / "config.json").write_text(json.dumps(config))
    return out


def fp8_moe(tmp_path: Path, model_type: str, layout: str) -> Path:
    """Every token routed to all four experts: top-k routing is discontinuous, and a logit bound needs a model
    whose output moves smoothly with its weights."""
    import transformers as tf

    config = moe_config(model_type)
    config.num_experts_per_tok = 4
    model = randomized(tf.AutoModelForCausalLM.from_config(config))
    return quantized_copy(save_layout(model, tmp_path / "float", layout), tmp_path / "fp8")  # type: ignore[arg-type]


def dequantized(directory: Path) -> dict[str, torch.Tensor]:
    """Every FP8 weight of a checkpoint as fp32 deq(q, s); other tensors as stored."""
    tensors = read_tensors(directory)
    return {
        name: fp8.dequantize_blocks(t, tensors[f"{name}_scale_inv"], BLOCK) if t.dtype == torch.float8_e4m3fn else t
        for name, t in tensors.items()
        if not name.endswith("_scale_inv")
    }


def transformers_model(directory: Path) -> Any:
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def test_deepseek_fp8_experts_merged_in_format(tmp_path: Path) -> None:
    from peft import PeftModel

    base = fp8_moe(tmp_path, "deepseek_v3", "saved")
    # On deq(BASE); ΔW of the order of W, which the fp8 step (1/16 of |W|) keeps most of.
    adapter = save_moe_adapter(base, tmp_path / "adapter", 0.5, r=2, lora_alpha=3, **DEEPSEEK_LORA)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert all(c.complete for c in summary.plan.experts) and len(summary.plan.experts) == 2
    stored, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert stored.keys() == original.keys()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    figures = {f.tensor: f for f in summary.requantized}
    experts = [n for n in figures if ".mlp.experts." in n]
    assert len(experts) == 4 * 3 and len(figures) == len(experts) + 2 + 2 + 1  # + q_a, kv_b in 2 layers, shared up
    for name, tensor in original.items():  # every FP8 weight not touched keeps its bytes, and its scale
        if name not in figures and f"{name.removesuffix('_scale_inv')}" not in figures:
            assert torch.equal(stored[name].view(torch.uint8), tensor.view(torch.uint8)), name
        if name in figures:
            assert stored[name].dtype == torch.float8_e4m3fn and not torch.equal(stored[name].float(), tensor.float())
    base_model = transformers_model(base)
    with torch.no_grad():
        before = base_model(input_ids=TOKENS).logits
        peft_model = PeftModel.from_pretrained(base_model, adapter).eval()
        want = peft_model(input_ids=TOKENS).logits
    out_model = transformers_model(tmp_path / "out")
    ours, merged_by_peft = dequantized(tmp_path / "out"), peft_model.merge_and_unload().state_dict()
    loaded = out_model.state_dict()
    for name in ours:  # transformers' FP8 loading of OUT is deq(q', s') of what we stored
        if ".mlp.experts." not in name and name in loaded:
            assert torch.equal(loaded[name], ours[name]), name
    experts_of = {n: n for n in loaded}
    for layer_param in ("gate_up_proj", "down_proj"):  # transformers fuses our per-expert FP8 tensors on load
        parts = ("gate_proj", "up_proj") if layer_param == "gate_up_proj" else ("down_proj",)
        fused = torch.stack([
            torch.cat([ours[f"model.layers.1.mlp.experts.{e}.{p}.weight"] for p in parts]) for e in range(4)
        ])  # fmt: skip
        assert torch.equal(loaded[f"model.layers.1.mlp.experts.{layer_param}"], fused), layer_param
    assert experts_of
    worst = max(f.error for f in figures.values())
    assert worst < 0.5 and not any(f.lost for f in figures.values())
    # Each weight transformers loads from OUT misses PEFT's merged weight by exactly the reported error.
    deq_base = dequantized(base)
    for name, figure in figures.items():
        got_w, want_w, was = ours[name], peft_weight(merged_by_peft, name), deq_base[name]
        delta = (want_w - was).double()
        change = (got_w - was).double()
        assert figure.survival == pytest.approx(float(change.norm() / delta.norm()), rel=1e-4), name
        assert figure.error == pytest.approx(float((change - delta).norm() / delta.norm()), rel=1e-4), name
    with torch.no_grad():
        got = out_model(input_ids=TOKENS).logits
    # N(0, 1) weights make the model far from linear in them, so the logits move less cleanly than the weights:
    # OUT lands most of the way from BASE's logits to PEFT's.
    assert (got - want).norm() <= 0.5 * (before - want).norm()


def peft_weight(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The weight PEFT's merged (transformers-5, fused) model holds for checkpoint tensor `name`."""
    if ".mlp.experts." not in name:
        return state[name]
    layer, expert, part = name.removesuffix(".weight").rsplit(".", 2)  # …experts, 3, up_proj
    if part == "down_proj":
        return state[f"{layer}.down_proj"][int(expert)]
    fused = state[f"{layer}.gate_up_proj"][int(expert)]
    half = fused.shape[0] // 2
    return fused[:half] if part == "gate_proj" else fused[half:]


def reference_deltas(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    """PEFT's fused-parameter ΔW written out: A (r·E, in) -> (E, r, in); B (out, r·E) -> (out, r, E)."""
    a3 = a.double().reshape(experts, -1, a.shape[1])
    b3 = b.double().reshape(b.shape[0], -1, experts)
    return torch.einsum("ore,eri->eoi", b3, a3) * scale


def test_fused_fp8_experts_merged_by_formula(tmp_path: Path) -> None:
    """Qwen3-MoE stored fused (E, 2I, H) in FP8 with (E, 2I/8, H/8) scales; ΔW by PEFT's formula."""
    import transformers as tf
    from safetensors.torch import load_file

    model = randomized(tf.AutoModelForCausalLM.from_config(moe_config("qwen3_moe")))
    fp32 = save_layout(model, tmp_path / "float", "memory")
    adapter = save_moe_adapter(fp32, tmp_path / "adapter", 0.5, r=2, lora_alpha=3, target_parameters=["gate_up_proj"])
    base = quantized_copy(fp32, tmp_path / "fp8")
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert [c.layout for c in summary.plan.experts] == ["fused", "fused"]
    factors, ours, deq_base = load_file(adapter / "adapter_model.safetensors"), dequantized(tmp_path / "out"), {}
    deq_base = dequantized(base)
    for figure in summary.requantized:
        layer = figure.tensor.removesuffix(".mlp.experts.gate_up_proj")
        key = f"base_model.model.{layer}.mlp.experts"
        delta = reference_deltas(factors[f"{key}.lora_A.weight"], factors[f"{key}.lora_B.weight"], 1.5, 4)
        change = (ours[figure.tensor] - deq_base[figure.tensor]).double()
        assert figure.error == pytest.approx(float((change - delta).norm() / delta.norm()), rel=1e-4)
        assert figure.error < 0.5 and figure.survival > 0.5
        per_block = fp8.grid_shape(tuple(change.shape), BLOCK)
        assert read_tensors(tmp_path / "out")[f"{figure.tensor}_scale_inv"].shape == per_block
    assert len(summary.requantized) == 2


def test_dtype_bf16_dequantizes_and_drops_the_quantization(tmp_path: Path) -> None:
    base = fp8_moe(tmp_path, "deepseek_v3", "saved")
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **DEEPSEEK_LORA)
    lorasurgeon.merge(base, [adapter], tmp_path / "out", dtype="bf16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    ours = read_tensors(tmp_path / "out")
    assert not any(n.endswith("_scale_inv") for n in ours) and ours.keys() == dequantized(base).keys()
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    from peft import PeftModel

    merged = PeftModel.from_pretrained(transformers_model(base), adapter).merge_and_unload()
    want = transformers_model(tmp_path / "out").state_dict()  # a plain bf16 checkpoint now, loaded as such
    for name, tensor in merged.state_dict().items():
        assert ulp_distance(want[name].to(torch.bfloat16), tensor.to(torch.bfloat16)).max() <= 1, name


def test_unmerge_in_format(tmp_path: Path) -> None:
    base = fp8_moe(tmp_path, "deepseek_v3", "saved")
    adapter = save_moe_adapter(base, tmp_path / "adapter", 0.5, r=2, lora_alpha=3, **DEEPSEEK_LORA)
    lorasurgeon.merge(base, [adapter], tmp_path / "merged")
    summary = lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "back")
    back, original = dequantized(tmp_path / "back"), dequantized(base)
    for figure in summary.requantized:
        name = figure.tensor
        moved = (dequantized(tmp_path / "merged")[name] - original[name]).norm()
        assert (back[name] - original[name]).norm() <= 0.5 * moved, name  # most of the way back
    assert len(summary.requantized) > 10


def test_a_small_delta_is_flagged_as_lost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ΔW ~1% of W, below the fp8 step: the merge still writes what fp8 can hold, and says where it is lost."""
    from builders import run_cli

    base = fp8_moe(tmp_path, "deepseek_v3", "saved")
    adapter = save_moe_adapter(base, tmp_path / "adapter", 0.05, r=2, lora_alpha=3, **DEEPSEEK_LORA)
    code, out, err = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--json"], capsys)
    doc = json.loads(out)
    lost = [f for f in doc["requantized"] if f["lost"]]
    assert code == 0 and lost and all(f["survival"] < 0.5 or f["error"] > 0.5 for f in lost)
    assert doc["quantization"] == "FP8 e4m3 with 8×8 block scales"
    code, _, err = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "again")], capsys)
    assert "the adapter is mostly lost in the quantized weight" in err and lost[0]["tensor"] in err
