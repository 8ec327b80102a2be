"""lorasurgeon's merge against PEFT's own merge_and_unload() on tiny real models.

Tolerance (one rule, from the maths): fp32 results may differ from PEFT only by matmul accumulation order,
so |ours − PEFT| ≤ 1e-6 · max|tensor|. bf16/fp16 results are compared with PEFT's merge done in fp32 and
rounded once to the stored dtype: at most 1 ulp apart (both round the same fp32 sum; the sums differ only in
accumulation order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import logits, peft_merged, read_tensors, save_adapter, save_model

import lorasurgeon

pytestmark = pytest.mark.oracle


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two tensors of the same 16-bit float dtype."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)  # monotonic integer image of the float order

    return (ordered(a) - ordered(b)).abs()


def assert_matches_peft(out: Path, base: Path, oracle: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor of `out` equals the oracle within the rule above; returns the names that the merge changed."""
    ours, original = read_tensors(out), read_tensors(base)
    assert ours.keys() == original.keys()
    changed = []
    for name, tensor in ours.items():
        assert tensor.dtype == original[name].dtype, name
        expected = oracle[name].to(tensor.dtype)
        if tensor.dtype == torch.float32:
            tolerance = 1e-6 * expected.abs().max().item()
            assert (tensor - expected).abs().max().item() <= tolerance, name
        else:
            assert ulp_distance(tensor, expected).max().item() <= 1, name
        if not torch.equal(tensor, original[name]):
            changed.append(name)
    return changed


def projections(names: list[str], count: int) -> None:
    """Guard: the merge changed exactly the adapted projection weights, and nothing else."""
    assert len(names) == count, names
    assert all(n.endswith("proj.weight") or ".c_" in n for n in names), names


@pytest.mark.parametrize(
    ("dtype", "shard"),
    [
        (torch.float32, None),
        (torch.float32, "40KB"),
        (torch.bfloat16, None),
        (torch.bfloat16, "40KB"),
        (torch.float16, None),
    ],
    ids=["fp32", "fp32-sharded", "bf16", "bf16-sharded", "fp16"],
)
def test_llama_plain_lora(tmp_path: Path, dtype: torch.dtype, shard: str | None) -> None:
    base = save_model(tmp_path / "base", dtype=dtype, max_shard_size=shard)
    adapter = save_adapter(base, tmp_path / "lora", r=4, lora_alpha=8)
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", base, peft_merged(base, adapter))
    projections(changed, 14)
    if shard:
        shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
        assert shards == sorted(p.name for p in base.glob("*.safetensors")) and len(shards) > 1


def test_llama_rslora_with_patterns(tmp_path: Path, llama_dir: Path) -> None:
    adapter = save_adapter(
        llama_dir,
        tmp_path / "rs",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"mlp.down_proj": 4, "model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"self_attn.o_proj": 32, "layers.0.mlp.up_proj": 3},
    )
    summary = lorasurgeon.merge(llama_dir, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", llama_dir, peft_merged(llama_dir, adapter))
    projections(changed, 14)
    ranks = {t.module.module: (t.module.rank, t.module.alpha) for s in summary.plan.steps for t in s.terms}
    assert ranks["model.layers.1.self_attn.q_proj"] == (2, 16)
    assert ranks["model.layers.0.mlp.down_proj"] == (4, 16)
    assert ranks["model.layers.0.mlp.up_proj"] == (8, 3)


def test_llama_target_subset_and_layers(tmp_path: Path, llama_dir: Path) -> None:
    adapter = save_adapter(
        llama_dir, tmp_path / "sub", r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]
    )
    lorasurgeon.merge(llama_dir, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", llama_dir, peft_merged(llama_dir, adapter))
    assert sorted(changed) == ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]


def test_empty_layers_to_transform_selects_every_layer(tmp_path: Path, llama_dir: Path) -> None:
    """PEFT reads `layers_to_transform: []` as no restriction (tuners_utils.check_target_module_exists), not as
    "no layer"; lorasurgeon must too, or it would merge nothing."""
    adapter = save_adapter(llama_dir, tmp_path / "all", r=4, target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": []}))
    lorasurgeon.merge(llama_dir, [adapter], tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", llama_dir, peft_merged(llama_dir, adapter))
    assert len(changed) == 4  # q and v of both layers


@pytest.mark.parametrize("layout", ["dir", "single-file"])
def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path, layout: str) -> None:
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = save_adapter(base, tmp_path / "lora", arch="gpt2", r=4, lora_alpha=8, fan_in_fan_out=True)
    source = base if layout == "dir" else base / "model.safetensors"
    out = tmp_path / ("out" if layout == "dir" else "out.safetensors")
    lorasurgeon.merge(source, [adapter], out)
    oracle = peft_merged(base, adapter, arch="gpt2")
    changed = assert_matches_peft(out, base, oracle)
    # c_attn (32x96), c_proj (32x32, square: orientation from architecture or config), c_fc, mlp c_proj
    projections(changed, 8)


def test_merged_directory_gives_peft_logits(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "out")
    tokens = torch.arange(16).reshape(2, 8)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), llama_adapter).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    got = logits(tmp_path / "out", tokens=tokens)
    assert not torch.allclose(got, logits(llama_dir, tokens=tokens), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_two_adapters_weighted_equals_independent_sum(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """Weighted multi-adapter merge = base + Σ w_i·ΔW_i, each ΔW_i from PEFT's own merge (no cross terms)."""
    other = save_adapter(llama_dir, tmp_path / "other", seed=7, r=2, lora_alpha=4, target_modules=["q_proj"])
    lorasurgeon.merge(llama_dir, [llama_adapter, other], tmp_path / "out", weights=[0.7, -0.3])
    base = read_tensors(llama_dir)
    delta_1 = {k: v.double() - base[k].double() for k, v in peft_merged(llama_dir, llama_adapter).items() if k in base}
    delta_2 = {k: v.double() - base[k].double() for k, v in peft_merged(llama_dir, other).items() if k in base}
    ours = read_tensors(tmp_path / "out")
    for name, tensor in ours.items():
        expected = base[name].double() + 0.7 * delta_1[name] + -0.3 * delta_2[name]
        assert (tensor.double() - expected).abs().max().item() <= 1e-6 * expected.abs().max().item(), name
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_merge_matches_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_model(tmp_path / "base", dtype=dtype)
    adapter = save_adapter(base, tmp_path / "lora", r=4, lora_alpha=8)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out", device="cuda")
    assert summary.device.startswith("cuda")
    projections(assert_matches_peft(tmp_path / "out", base, peft_merged(base, adapter)), 14)


def test_two_halves_merge_bit_for_bit_like_one_whole(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """The same adapter twice at weight 0.5 gives exactly the merge at weight 1: deltas are summed before the
    one add (halving is exact in binary floating point, so the sum of the halves is the whole)."""
    lorasurgeon.merge(llama_dir, [llama_adapter, llama_adapter], tmp_path / "halves", weights=[0.5, 0.5])
    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "whole")
    halves, whole, base = (read_tensors(p) for p in (tmp_path / "halves", tmp_path / "whole", llama_dir))
    assert all(torch.equal(halves[n], whole[n]) for n in whole)
    assert not torch.equal(whole["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
