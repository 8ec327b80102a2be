"""transformers-5 names on disk versus in memory, checked against the installed transformers.

For each covered model: built from its config (every parameter random), written in each layout a checkpoint
can be in, and every in-memory tensor resolved through `transformers_names.checkpoint_names` (fused experts
through `moe.expert_slices`) must land on a tensor of the file holding the same values, and together they must
account for every tensor of the file. transformers' own `from_pretrained` is the oracle that the "legacy" and
"memory" files are layouts it reads (no missing or unexpected keys, same values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from moe_models import LEGACY_PREFIXES, Layout, moe_config, named_model, randomized, save_layout

from lorasurgeon.formats import moe, transformers_names

pytestmark = pytest.mark.oracle

MOE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "olmoe"]
FAMILIES = [
    "vit",
    "llava",
    "gemma3",
    "qwen2_vl",
    "bart",
    "whisper",
    "siglip_vision",
    "clip_vision",
    "clip_text",
    "clip_text_projection",
]
WITH_PREFIXES = list(LEGACY_PREFIXES)  # the families whose Hub files differ from what a fresh save writes


def moe_model(model_type: str) -> Any:
    import transformers as tf

    return randomized(tf.AutoModelForCausalLM.from_config(moe_config(model_type)))


def resolve_all(model: Any, directory: Path) -> list[tuple[str, str, str]]:
    """Every in-memory tensor of `model` resolved against the checkpoint in `directory`, value-checked, and
    together covering the file: (in-memory name, checkpoint tensor, convention) for each."""
    config = json.loads((directory / "config.json").read_text())
    saved = read_tensors(directory)
    layout = moe.layout_of(config)
    placed: list[tuple[str, str, str]] = []
    for name, value in model.state_dict().items():
        module, _, param = name.rpartition(".")
        if layout and module.endswith(".experts") and param in layout.params and value.dim() == 3:
            found = moe.expert_slices(config, name, tuple(value.shape), saved.keys())
            assert found.problem is None, found.problem
            for piece in found.slices:  # a per-expert piece is rows of that expert's (out, in) matrix
                per_expert = value[piece.expert or 0].T if layout.transposed else value[piece.expert or 0]
                expected = value if piece.expert is None else per_expert[piece.start : piece.stop : piece.step]
                assert tuple(expected.shape) == piece.shape == tuple(saved[piece.tensor].shape), piece
                assert torch.equal(saved[piece.tensor], expected), piece
                placed.append((name, piece.tensor, found.layout))
            continue
        resolution = transformers_names.checkpoint_names(config, name, saved.keys())
        assert resolution.problem is None, resolution.problem
        (stored,) = resolution.names
        assert torch.equal(saved[stored], value), (name, stored)
        placed.append((name, stored, resolution.convention))
    covered = {stored for _, stored, _ in placed}
    assert covered == saved.keys(), sorted(covered ^ saved.keys())
    return placed


def assert_transformers_reads(model: Any, directory: Path) -> Any:
    """The oracle: transformers loads `directory` into exactly `model`'s tensors (returns the loaded model)."""
    loaded, info = type(model).from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    return loaded


@pytest.mark.parametrize("model_type", MOE_TYPES)
@pytest.mark.parametrize("layout", ["saved", "memory"])
def test_moe_checkpoints_hold_every_parameter(model_type: str, layout: Layout, tmp_path: Path) -> None:
    model = moe_model(model_type)
    directory = save_layout(model, tmp_path / "base", layout)
    placed = resolve_all(model, directory)
    loaded = assert_transformers_reads(model, directory)
    loaded.save_pretrained(tmp_path / "again")  # fused stays fused, per-expert stays per-expert
    assert read_tensors(tmp_path / "again").keys() == read_tensors(directory).keys()
    per_expert = [disk for _, disk, _ in placed if ".experts.3." in disk]
    fused = model_type == "gpt_oss" or layout == "memory"
    assert bool(per_expert) != fused, per_expert  # guard: the layout really is the one under test


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_layout_flags_are_the_experts_class_own(model_type: str) -> None:
    """The table against the live experts module: parameter order (PEFT's nesting order), `is_transposed` as
    PEFT reads it, concatenated vs interleaved gate/up, and the config key holding the number of experts."""
    model = moe_model(model_type)
    experts = model.model.layers[1].mlp.experts
    layout = moe.LAYOUTS[model_type]
    assert tuple(name for name, _ in experts.named_parameters(recurse=False)) == layout.params
    assert getattr(experts, "is_transposed", False) == layout.transposed
    assert getattr(experts, "is_concatenated", True) != layout.interleaved
    assert moe.num_experts(model.config.to_dict()) == experts.gate_up_proj.shape[0] == 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["saved", "legacy", "memory"])
def test_renamed_checkpoints_hold_every_parameter(family: str, layout: Layout, tmp_path: Path) -> None:
    if layout == "legacy" and family not in WITH_PREFIXES:
        pytest.skip(f"{family}: its legacy layout is the saved one")
    model = randomized(named_model(family))
    directory = save_layout(model, tmp_path / "base", layout, family)
    placed = resolve_all(model, directory)
    loaded = assert_transformers_reads(model, directory)
    loaded.save_pretrained(tmp_path / "again")  # save_pretrained writes back the layout it loaded from
    assert read_tensors(tmp_path / "again").keys() == read_tensors(directory).keys()
    renamed = [(memory, disk) for memory, disk, how in placed if memory != disk and "tied" not in how]
    tied = [(memory, disk) for memory, disk, how in placed if "tied" in how]
    # A model built from its config saves without its PrefixChanges: then only WeightRenamings show on disk.
    differs = layout == "legacy" or (layout == "saved" and family in ("vit", "llava", "gemma3", "qwen2_vl"))
    assert bool(renamed) == differs, renamed[:3]
    assert bool(tied) == (family in ("bart", "whisper", "gemma3")), tied


@pytest.mark.parametrize("family", ["vit", "llava", "gemma3", "qwen2_vl", "clip_text", "siglip_vision"])
def test_legacy_adapter_names_resolve_against_memory_layout(family: str, tmp_path: Path) -> None:
    """An adapter trained on an older transformers speaks the legacy names; the file may be in the new layout."""
    model = randomized(named_model(family))
    layout: Layout = "legacy" if family in WITH_PREFIXES else "saved"
    legacy = read_tensors(save_layout(model, tmp_path / "legacy", layout, family))
    memory_dir = save_layout(model, tmp_path / "memory", "memory")
    config = json.loads((memory_dir / "config.json").read_text())
    memory = read_tensors(memory_dir)
    moved = 0
    for name, value in legacy.items():
        resolution = transformers_names.checkpoint_names(config, name, memory.keys())
        assert resolution.problem is None, resolution.problem
        assert torch.equal(memory[resolution.names[0]], value), name
        moved += resolution.names[0] != name
    assert moved, "guard: some names differ between the layouts"


def test_in_memory_names_are_fixed_points() -> None:
    """A name already in memory form must not be converted again (transformers' look-aheads)."""
    for family in FAMILIES:
        model = named_model(family)
        convention = transformers_names.convention_of(
            model.config.to_dict() | {"architectures": [type(model).__name__]}
        )
        if convention is None:
            continue
        for name in model.state_dict():
            assert transformers_names.to_memory(convention, name) == name, (family, name)


def test_mixtral_router_and_problems() -> None:
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    disk = ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.self_attn.q_proj.weight"]
    found = transformers_names.checkpoint_names(config, "model.layers.0.mlp.gate.weight", disk)
    assert found.names == ("model.layers.0.block_sparse_moe.gate.weight",) and found.problem is None
    assert found.convention == "mixtral legacy layout"
    exact = transformers_names.checkpoint_names(config, "model.layers.0.self_attn.q_proj.weight", disk)
    assert exact.convention == "exact"
    missing = transformers_names.checkpoint_names(config, "model.layers.1.mlp.gate.weight", disk)
    assert missing.names == () and missing.problem is not None
    assert "mixtral convention" in missing.problem and "model.layers.1.block_sparse_moe.gate.weight" in missing.problem
    both = transformers_names.checkpoint_names(
        config, "model.layers.0.mlp.gate.weight", [*disk, disk[0].replace("block_sparse_moe", "mlp")]
    )
    assert both.problem is not None and "ambiguous" in both.problem


def test_tied_tensors_resolve_to_their_source() -> None:
    bart = {"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}
    found = transformers_names.checkpoint_names(bart, "model.decoder.embed_tokens.weight", ["model.shared.weight"])
    assert found.names == ("model.shared.weight",) and found.tied_to == "model.shared.weight"
    untied = transformers_names.checkpoint_names(
        bart | {"tie_word_embeddings": False}, "model.decoder.embed_tokens.weight", ["model.shared.weight"]
    )
    assert untied.problem is not None and untied.names == ()
    whisper = {"model_type": "whisper"}
    found = transformers_names.checkpoint_names(whisper, "proj_out.weight", ["model.decoder.embed_tokens.weight"])
    assert found.names == ("model.decoder.embed_tokens.weight",)


# ------------------------------------------------------------------ the PEFT oracle for renamed and tied names

TARGETS = {
    "vit": ["q_proj", "fc2"],
    "llava": ["q_proj", "linear_1"],  # the language model's and the CLIP tower's q_proj
    "gemma3": ["q_proj", "fc1"],
    "qwen2_vl": ["q_proj", "qkv"],
    "bart": ["decoder.embed_tokens", "q_proj"],  # an Embedding LoRA on the tied, unsaved decoder embedding
    "whisper": ["proj_out", "q_proj"],  # the tied, unsaved output projection
    "siglip_vision": ["out_proj", "fc1"],  # the attention-pooling head's out_proj and MLP among them
    "clip_vision": ["q_proj"],
    "clip_text": ["q_proj", "fc1"],
}


def expected_names_merge(directory: Path, adapter_dir: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """BASE + each module's delta on the tensor `checkpoint_names` gives (Linear s·BA, Embedding s·(BA)ᵀ)."""
    config = json.loads((directory / "config.json").read_text())
    lora = json.loads((adapter_dir / "adapter_config.json").read_text())
    base, adapter = read_tensors(directory), read_tensors(adapter_dir)
    merged = {k: v.double() for k, v in base.items()}
    scale = lora["lora_alpha"] / lora["r"]
    for key in adapter:
        embedding = key.endswith(".lora_embedding_A")
        if not (key.endswith(".lora_A.weight") or embedding):
            continue
        module = key.removeprefix("base_model.model.").rpartition(".lora_")[0]
        b = adapter[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")].double()
        delta = scale * (b @ adapter[key].double())  # (out, r) @ (r, in)
        resolution = transformers_names.checkpoint_names(config, f"{module}.weight", base.keys())
        assert resolution.problem is None, resolution.problem
        merged[resolution.names[0]] += delta.T if embedding else delta
    changed = {k for k in base if not torch.equal(merged[k].float(), base[k])}
    return {k: v.float() for k, v in merged.items()}, changed


@pytest.mark.parametrize(("family", "layout"), [(f, "saved") for f in TARGETS] + [(f, "legacy") for f in WITH_PREFIXES])
def test_merge_through_renames_matches_peft(family: str, layout: Layout, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    model = randomized(named_model(family))
    directory = save_layout(model, tmp_path / "base", layout, family)
    loaded = type(model).from_pretrained(directory, dtype=torch.float32)
    peft_model = get_peft_model(loaded, LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS[family]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = type(model).from_pretrained(directory, dtype=torch.float32)
    PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "merged")
    oracle, base = read_tensors(tmp_path / "merged"), read_tensors(directory)
    ours, changed = expected_names_merge(directory, tmp_path / "adapter")
    assert oracle.keys() == base.keys()
    for name, tensor in oracle.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-5 * tensor.abs().max().item(), name
        assert torch.equal(tensor, base[name]) == (name not in changed), name
    assert len(changed) >= len(TARGETS[family])  # guard: every target kind changed some tensor


def test_unknown_models_say_so() -> None:
    found = transformers_names.checkpoint_names({"model_type": "llama"}, "model.norm.weight", ["norm.weight"])
    assert found.problem is not None and "no transformers renaming is known for llama" in found.problem
    assert transformers_names.checkpoint_names({"model_type": "llama"}, "norm.weight", ["norm.weight"]).names
