"""MoE expert deltas: `moe`'s maths and layout tables against PEFT's own merge on transformers-5 models.

The oracle: PEFT's `merge_and_unload()` of the saved adapter on the base loaded with `from_pretrained`, then
`save_pretrained`, read back tensor by tensor. The expectation: each adapter key placed with `moe` and
`transformers_names` onto the BASE file's tensors, its delta computed by `moe`'s maths. Tolerance (fp32, one rule):
only accumulation order differs, so |ours − PEFT| ≤ 1e-5 · max|PEFT| per tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_models import CASES, EXPERTS, moe_config, peft_merged, randomized, save_layout, save_moe_adapter

from lorasurgeon import experts as maths
from lorasurgeon.formats import moe, transformers_names


def reference_deltas(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int) -> torch.Tensor:
    """PEFT's formula written out independently: A (r·E, in) -> (E, r, in); B (out, r·E) -> (out, r, E)."""
    a3 = a.double().reshape(experts, -1, a.shape[1])
    b3 = b.double().reshape(b.shape[0], -1, experts)
    return torch.einsum("ore,eri->eoi", b3, a3) * scale


def test_expert_delta_literal() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # E=2, r=1: expert 0 owns row 0, expert 1 row 1
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 5.0]])  # expert 0 owns column 0, expert 1 column 1
    deltas = maths.expert_deltas(a, b, 0.5, 2, transposed=False)
    expected = torch.tensor([[[0.5, 1.0], [0.0, 0.0], [1.0, 2.0]], [[0.0, 0.0], [1.5, 2.0], [7.5, 10.0]]])
    assert torch.equal(deltas, expected)
    assert torch.equal(maths.expert_deltas(a, b, 0.5, 2, transposed=True), expected.transpose(1, 2))
    assert maths.silent_experts(a, b, 2) == ()
    assert maths.silent_experts(a, b * torch.tensor([0.0, 1.0]), 2) == (0,)


@settings(max_examples=40, deadline=None)
@given(
    experts=st.integers(1, 5),
    rank=st.integers(1, 4),
    out=st.integers(1, 6).map(lambda n: 2 * n),
    inp=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_expert_deltas_match_the_formula(experts: int, rank: int, out: int, inp: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank * experts, inp, generator=generator, dtype=torch.float64)
    b = torch.randn(out, rank * experts, generator=generator, dtype=torch.float64)
    expected = reference_deltas(a, b, 0.75, experts)
    assert torch.allclose(maths.expert_deltas(a, b, 0.75, experts, transposed=False), expected, rtol=1e-12)
    half = out // 2
    for expert in range(experts):
        for start, stop, step in [(0, half, 1), (half, out, 1), (0, out, 2), (1, out, 2)]:
            got = maths.slice_delta(a, b, 0.75, experts, expert, slice(start, stop, step))
            assert torch.allclose(got, expected[expert, start:stop:step], rtol=1e-12)
    assert (expected != 0).any()  # guard


def test_nesting_follows_the_class_parameter_order() -> None:
    mixtral = moe.LAYOUTS["mixtral"]
    module = "model.layers.0.mlp.experts"
    assert moe.adapted_parameter(mixtral, module, 0, EXPERTS) == "down_proj"
    assert moe.adapted_parameter(mixtral, module, 1, EXPERTS) == "gate_up_proj"
    assert moe.adapted_parameter(mixtral, module, 2, EXPERTS) is None
    assert moe.adapted_parameter(mixtral, module, 0, ["gate_up_proj"]) == "gate_up_proj"
    assert moe.adapted_parameter(mixtral, module, 0, ["layers.1.mlp.experts.down_proj"]) is None


def test_expert_slices_say_why() -> None:
    config = {"model_type": "qwen3_moe"}
    names = {f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(3) for p in ("gate_proj", "up_proj")}
    four = moe.expert_slices(config, "model.layers.0.mlp.experts.gate_up_proj", (4, 48, 32), names)
    assert four.problem is not None and "experts.3.gate_proj.weight" in four.problem and not four.slices
    two = moe.expert_slices(config, "model.layers.0.mlp.experts.gate_up_proj", (2, 48, 32), names)
    assert two.problem is not None and "more than 2 experts" in two.problem
    three = moe.expert_slices(config, "model.layers.0.mlp.experts.gate_up_proj", (3, 48, 32), names)
    assert three.problem is None and three.layout == "per-expert" and len(three.slices) == 6
    assert three.slices[1] == moe.ExpertSlice("model.layers.0.mlp.experts.0.up_proj.weight", 0, 24, 48, 1, (24, 32))
    unknown = moe.expert_slices({"model_type": "llama"}, "model.layers.0.mlp.experts.gate_up_proj", (3, 48, 32), names)
    assert unknown.problem is not None and "'llama'" in unknown.problem


@pytest.mark.oracle
@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe"])
def test_part_rows_are_the_gate_and_up_the_experts_use(model_type: str) -> None:
    """transformers' own gate: feeding it a gate_up output whose `part_rows` pieces are (g, u) gives act(g, u)."""
    import transformers as tf

    experts = tf.AutoModelForCausalLM.from_config(moe_config(model_type)).model.layers[1].mlp.experts
    layout = moe.LAYOUTS[model_type]
    (gate_name, *gate), (up_name, *up) = moe.part_rows(layout, "gate_up_proj", 48)
    assert (gate_name, up_name) == (("gate", "up") if model_type == "gpt_oss" else ("gate_proj", "up_proj"))
    g, u = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    fused = torch.empty(5, 48)
    fused[:, slice(*gate)], fused[:, slice(*up)] = g, u
    swapped = torch.empty_like(fused)
    swapped[:, slice(*gate)], swapped[:, slice(*up)] = u, g
    ours = experts._apply_gate(fused)
    assert not torch.allclose(ours, experts._apply_gate(swapped))  # guard: gate and up are not interchangeable
    if model_type == "gpt_oss":  # GptOssExperts: clamped gate · sigmoid(α·gate) · (clamped up + 1)
        limit, alpha = experts.limit, experts.alpha
        gate_c = g.clamp(max=limit)
        expected = (u.clamp(-limit, limit) + 1) * gate_c * torch.sigmoid(gate_c * alpha)
    else:
        expected = experts.act_fn(g) * u
    assert torch.allclose(ours, expected)


# ------------------------------------------------------------------ the PEFT oracle


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", key)), default)


def expected_merge(base_dir: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """BASE + every adapter delta, placed by `moe` and `transformers_names`; also {tensor: the keys that hit it}."""
    config = json.loads((base_dir / "config.json").read_text())
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    base, adapter = read_tensors(base_dir), read_tensors(adapter_dir)
    merged = {k: v.double() for k, v in base.items()}
    layout, experts = moe.layout_of(config), moe.num_experts(config)
    assert layout is not None and experts is not None
    hits: dict[str, list[str]] = {}
    for key in sorted(k for k in adapter if k.endswith(".lora_A.weight")):
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        module = path.replace(".base_layer", "")
        wrapped = module.endswith(".experts")
        param = moe.adapted_parameter(layout, module, path.count(".base_layer"), lora["target_parameters"] or [])
        param = param if wrapped else "weight"
        targets = lora["target_parameters"] or []
        by_param = any(f"{module}.{param}" == t or f"{module}.{param}".endswith(f".{t}") for t in targets)
        rank_key = f"{module}.{param}" if by_param else module  # ParamWrapper matches patterns on the parameter
        r = pattern_value(lora["rank_pattern"] or {}, rank_key, lora["r"])
        alpha = pattern_value(lora["alpha_pattern"] or {}, rank_key, lora["lora_alpha"])
        scale = alpha / math.sqrt(r) if lora["use_rslora"] else alpha / r
        if wrapped:
            assert a.shape[0] == r * experts, key
            shape = moe.fused_shape(layout, experts, b.shape[0], a.shape[1])
            found = moe.expert_slices(config, f"{module}.{param}", shape, base.keys())
            assert found.problem is None, found.problem
            for piece in found.slices:
                if piece.expert is None:
                    merged[piece.tensor] += maths.expert_deltas(a, b, scale, experts, layout.transposed)
                else:
                    rows = slice(piece.start, piece.stop, piece.step)
                    merged[piece.tensor] += maths.slice_delta(a, b, scale, experts, piece.expert, rows)
                hits.setdefault(piece.tensor, []).append(key)
        else:
            resolution = transformers_names.checkpoint_names(config, f"{module}.weight", base.keys())
            assert resolution.problem is None, resolution.problem
            merged[resolution.names[0]] += scale * (b @ a)  # (out, r) @ (r, in)
            hits.setdefault(resolution.names[0], []).append(key)
    return {k: v.float() for k, v in merged.items()}, hits


@pytest.mark.oracle
# PEFT checks rank/alpha patterns against the targeted modules only, not the parameters they do apply to.
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
@pytest.mark.parametrize(("model_type", "lora"), CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
@pytest.mark.parametrize("layout", ["saved", "memory"])
def test_merge_matches_peft(model_type: str, lora: dict[str, Any], layout: str, tmp_path: Path) -> None:
    import transformers as tf

    if model_type == "gpt_oss" and layout == "memory":
        pytest.skip("gpt_oss: its saved layout is already the fused in-memory one")
    base_dir = save_layout(
        randomized(tf.AutoModelForCausalLM.from_config(moe_config(model_type))), tmp_path / "base", layout
    )
    adapter_dir = save_moe_adapter(base_dir, tmp_path / "adapter", r=2, lora_alpha=3, **lora)
    oracle = peft_merged(base_dir, adapter_dir, tmp_path / "merged")
    ours, hits = expected_merge(base_dir, adapter_dir)
    base = read_tensors(base_dir)
    assert oracle.keys() == base.keys()  # PEFT's save keeps the layout the base was loaded from
    for name, tensor in oracle.items():
        tolerance = 1e-5 * tensor.abs().max().item()
        assert (ours[name] - tensor).abs().max().item() <= tolerance, name
        assert torch.equal(tensor, base[name]) == (name not in hits), name  # changed exactly where we put deltas
    fused = layout == "memory" or model_type == "gpt_oss"
    expert_tensors = [n for n in hits if ".experts." in n]
    per_layer = (1 if model_type == "olmoe" else 2) if fused else 4 * (2 if model_type == "olmoe" else 3)
    moe_layers = 1 if model_type == "deepseek_v3" else 2
    assert len(expert_tensors) == per_layer * moe_layers, sorted(expert_tensors)  # every targeted expert touched
