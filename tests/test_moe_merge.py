"""`lorasurgeon merge` of PEFT target_parameters adapters on transformers-5 MoE models, against PEFT itself.

The oracle, per MoE family and base layout (per-expert as save_pretrained writes it, fused as in memory):
PEFT's `merge_and_unload()` + `save_pretrained`, compared file by file and tensor by tensor (fp32: only
accumulation order differs, |ours − PEFT| ≤ 1e-5 · max|PEFT|; bf16: within 1 ulp of PEFT's fp32 merge rounded
once), and `from_pretrained(OUT)` giving the logits of PEFT's unmerged forward. Guards: the merge changes exactly
the tensors PEFT changes, and its self-test counts every targeted expert of every MoE layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from moe_models import CASES, moe_config, peft_merged, randomized, save_layout, save_moe_adapter
from test_oracle_peft import ulp_distance

import lorasurgeon

pytestmark = [
    pytest.mark.oracle,
    # PEFT checks rank/alpha patterns against the targeted modules only, not the parameters they do apply to.
    pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning"),
]
TOKENS = torch.arange(12).reshape(2, 6)


def moe_base(model_type: str, directory: Path, layout: str, dtype: torch.dtype = torch.float32) -> Path:
    import transformers as tf

    model = randomized(tf.AutoModelForCausalLM.from_config(moe_config(model_type))).to(dtype)
    return save_layout(model, directory, layout)  # type: ignore[arg-type]


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, adapter).eval()(input_ids=TOKENS).logits


def merged_logits(out: Path) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def expected_experts(model_type: str, lora: dict[str, Any]) -> int:
    """How many experts modules (layer × fused parameter) the case targets."""
    moe_layers = 1 if model_type == "deepseek_v3" else 2
    if lora.get("target_modules") == "all-linear":
        return 2 * moe_layers
    return moe_layers * len([t for t in lora["target_parameters"] if ".experts." in t])


@pytest.mark.parametrize(("model_type", "lora"), CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
@pytest.mark.parametrize("layout", ["saved", "memory"])
def test_merge_matches_peft(model_type: str, lora: dict[str, Any], layout: str, tmp_path: Path) -> None:
    if model_type == "gpt_oss" and layout == "memory":
        pytest.skip("gpt_oss: its saved layout is already the fused in-memory one")
    base = moe_base(model_type, tmp_path / "base", layout)
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **lora)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    oracle, ours, original = peft_merged(base, adapter, tmp_path / "peft"), read_tensors(tmp_path / "out"), {}
    original = read_tensors(base)
    assert ours.keys() == oracle.keys() == original.keys()
    for name, tensor in oracle.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-5 * tensor.abs().max().item(), name
        assert torch.equal(ours[name], original[name]) == torch.equal(tensor, original[name]), name  # guard
    counts = summary.plan.experts
    assert len(counts) == expected_experts(model_type, lora), counts
    assert all(c.complete and c.placed == 4 for c in counts), counts
    fused = layout == "memory" or model_type == "gpt_oss"
    assert {c.layout for c in counts} == {"fused" if fused else "per-expert"}
    assert torch.allclose(merged_logits(tmp_path / "out"), peft_logits(base, adapter), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_bf16_merge_is_peft_fp32_rounded_once(model_type: str, tmp_path: Path) -> None:
    lora = dict(CASES)[model_type] if model_type != "qwen3_moe" else {"target_modules": "all-linear"}
    base = moe_base(model_type, tmp_path / "base", "saved", torch.bfloat16)
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **lora)
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    oracle, ours, original = peft_merged(base, adapter, tmp_path / "peft"), read_tensors(tmp_path / "out"), {}
    original = read_tensors(base)
    changed = 0
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        assert ulp_distance(tensor, oracle[name].to(torch.bfloat16)).max().item() <= 1, name
        changed += not torch.equal(tensor, original[name])
    assert changed > 8  # guard: experts, router and attention all changed


def test_an_expert_left_unchanged_is_an_error(tmp_path: Path) -> None:
    """The self-test: expert 2's columns of lora_B zeroed, so its ΔW is exactly 0; the merge refuses."""
    from safetensors.torch import load_file, save_file

    base = moe_base("qwen3_moe", tmp_path / "base", "saved")
    adapter = save_moe_adapter(
        base, tmp_path / "adapter", r=2, lora_alpha=3, target_parameters=["mlp.experts.down_proj"]
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("layers.1.mlp.experts.lora_B.weight"))
    tensors[key][:, 2::4] = 0
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(lorasurgeon.LorasurgeonError, match=r"leaves expert 2 of model\.layers\.1\.mlp\.experts"):
        lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unmerge_restores_the_base(tmp_path: Path) -> None:
    base = moe_base("mixtral", tmp_path / "base", "saved")
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **dict(CASES)["mixtral"])
    lorasurgeon.merge(base, [adapter], tmp_path / "merged")
    lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "back")
    back, original, merged = read_tensors(tmp_path / "back"), read_tensors(base), read_tensors(tmp_path / "merged")
    for name, tensor in original.items():
        assert torch.allclose(back[name], tensor, atol=1e-6), name
    assert sum(not torch.equal(merged[n], original[n]) for n in original) > 20  # guard


def test_normal_form_of_a_target_parameters_adapter(tmp_path: Path) -> None:
    """all-linear on Qwen3-MoE: PEFT writes target_parameters itself, gate_up_proj at rank 2r (rank_pattern)."""
    from lorasurgeon.formats import load_adapter

    base = moe_base("qwen3_moe", tmp_path / "base", "saved")
    adapter = load_adapter(save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, target_modules="all-linear"))
    by_path = {(m.module, m.parameter): m for m in adapter.modules}
    gate_up = by_path[("model.layers.0.mlp.experts", "gate_up_proj")]
    down = by_path[("model.layers.0.mlp.experts", "down_proj")]
    router = by_path[("model.layers.0.mlp.gate", "weight")]
    assert (gate_up.kind, gate_up.experts, gate_up.rank, gate_up.a.shape) == ("experts", 4, 4, (16, 32))
    assert (down.kind, down.experts, down.rank, down.scale) == ("experts", 4, 2, 1.5)
    assert "base_layer" in gate_up.a.name and "base_layer" not in down.a.name  # the first parameter is innermost
    assert (router.kind, router.experts, router.rank) == ("linear", 0, 2)
    assert not adapter.unselected and not adapter.problems


def test_check_and_merge_documents_count_experts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from builders import run_cli

    base = moe_base("deepseek_v3", tmp_path / "base", "saved")
    lora = {"target_modules": ["q_a_proj", "down_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **lora)
    code, out, _ = run_cli(["check", str(base), str(adapter), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"]
    assert [(e["module"], e["parameter"], e["experts_touched"], e["layout"]) for e in doc["experts"]] == [
        ("model.layers.1.mlp.experts", "gate_up_proj", 4, "per-expert"),
        ("model.layers.1.mlp.experts", "down_proj", 4, "per-expert"),
    ]
    moved = [f["message"] for f in doc["findings"] if "adapts only the routed experts" in f["message"]]
    assert len(moved) == 1 and "model.layers.1.mlp.shared_experts.down_proj.weight" in moved[0]
    assert "model.layers.0.mlp.down_proj.weight" in moved[0]  # the dense layer's: PEFT leaves it too
    code, out, err = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "MoE experts touched: model.layers.1.mlp.experts: gate_up_proj 4/4 experts" in err
    merged, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert torch.equal(merged["model.layers.1.mlp.shared_experts.down_proj.weight"], original[
        "model.layers.1.mlp.shared_experts.down_proj.weight"
    ])  # fmt: skip
    assert not torch.equal(merged["model.layers.1.mlp.experts.3.down_proj.weight"], original[
        "model.layers.1.mlp.experts.3.down_proj.weight"
    ])  # fmt: skip


@pytest.mark.parametrize("layout", ["saved", "memory"])
def test_report_of_moe_adapter_and_checkpoint(layout: str, tmp_path: Path) -> None:
    """report: experts modules with their experts and per-expert parameters, LoRA parameters per layer, the
    checkpoint's experts layout; --stats gives per-expert ΔW norms (‖ΔW‖_F² summed over experts); the JSON fits
    report.schema.json."""
    import json

    import jsonschema

    from lorasurgeon.documents import report_doc

    base = moe_base("qwen3_moe", tmp_path / "base", layout)
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, target_modules="all-linear")
    schema = json.loads((Path(lorasurgeon.__file__).parent / "report.schema.json").read_text())
    checkpoint = report_doc(lorasurgeon.report(base))
    jsonschema.validate(checkpoint, schema)
    assert checkpoint["config"]["experts_layout"] == ("per-expert" if layout == "saved" else "fused")
    doc = report_doc(lorasurgeon.report(adapter, base=base, stats=True))
    jsonschema.validate(doc, schema)
    modules = {m["module"]: m for m in doc["adapter"]["modules"]}
    gate_up = modules["model.layers.1.mlp.experts.gate_up_proj"]
    assert (gate_up["kind"], gate_up["experts"], gate_up["rank"], gate_up["base_shape"]) == (
        "experts",
        4,
        4,
        [4, 48, 32],
    )
    assert gate_up["parameters_per_expert"] == 4 * (32 + 48) and gate_up["parameters"] == 4 * 4 * (32 + 48)
    assert doc["adapter"]["targets"]["down_proj"] == 2 and doc["check"]["ok"]
    assert doc["adapter"]["per_layer"]["0"] == doc["adapter"]["per_layer"]["1"] > gate_up["parameters"]
    from safetensors.torch import load_file

    factors = load_file(adapter / "adapter_model.safetensors")
    a, b = (factors[f"base_model.model.model.layers.1.mlp.experts.base_layer.lora_{r}.weight"] for r in "AB")
    a3, b3 = a.double().reshape(4, 4, 32), b.double().reshape(48, 4, 4)
    delta = torch.einsum("ore,eri->eoi", b3, a3) * gate_up["scale"]
    assert gate_up["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    assert gate_up["delta_spectral_norm"] == pytest.approx(
        max(float(torch.linalg.matrix_norm(d, 2)) for d in delta), rel=1e-4
    )


def test_convert_keeps_a_peft_moe_adapter_and_refuses_kohya(tmp_path: Path) -> None:
    """convert --to peft rewrites the adapter with its nesting (PEFT loads it: same forward); kohya and diffusers
    files cannot hold LoRA on raw parameters, and say so by name."""
    base = moe_base("mixtral", tmp_path / "base", "saved")
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **dict(CASES)["mixtral"])
    lorasurgeon.convert(adapter, tmp_path / "copy", to="peft")
    assert read_tensors(tmp_path / "copy").keys() == read_tensors(adapter).keys()
    assert torch.equal(peft_logits(base, tmp_path / "copy"), peft_logits(base, adapter))
    for to in ("kohya", "diffusers"):
        with pytest.raises(lorasurgeon.LorasurgeonError, match=r"experts\..*raw parameter \(PEFT target_parameters"):
            lorasurgeon.convert(adapter, tmp_path / f"out-{to}", to=to)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_extract_per_expert_matrices_that_peft_loads(model_type: str, tmp_path: Path) -> None:
    """A fine-tune's experts stored per expert extract into per-expert LoRA matrices (PEFT target_modules w1/w2/w3
    or gate/up/down_proj), which PEFT converts onto the fused transformers-5 model: its forward is the tuned one."""
    base = moe_base(model_type, tmp_path / "base", "saved")
    lora = {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, **lora)
    lorasurgeon.merge(base, [adapter], tmp_path / "tuned")
    summary = lorasurgeon.extract(base, tmp_path / "tuned", tmp_path / "lora", rank=2)
    assert len(summary.matrices) == 2 * (1 + 4 * 3) and summary.total_error < 1e-5  # a rank-2 ΔW per half
    assert torch.allclose(peft_logits(base, tmp_path / "lora"), merged_logits(tmp_path / "tuned"), atol=1e-4)


def test_extract_refuses_fused_experts_by_name(tmp_path: Path) -> None:
    base = moe_base("qwen3_moe", tmp_path / "base", "memory")
    adapter = save_moe_adapter(base, tmp_path / "adapter", r=2, lora_alpha=3, target_parameters=["gate_up_proj"])
    lorasurgeon.merge(base, [adapter], tmp_path / "tuned")
    with pytest.raises(lorasurgeon.LorasurgeonError, match=r"mlp\.experts\.gate_up_proj \(fused MoE experts, 2 such"):
        lorasurgeon.extract(base, tmp_path / "tuned", tmp_path / "lora", rank=2)
    assert not (tmp_path / "lora").exists()
