"""convert (issue 5): PEFT, kohya and diffusers adapters rewritten into one another with the same A and B bytes
and the same ΔW (shared FORMATS.md §1.4, §5.1-§5.7, §6.4).

Oracles: PEFT itself (PeftModel.from_pretrained: each LoRA layer's `scaling`, the key warnings it gives, its
merge_and_unload), diffusers' own loaders (lora_state_dict + load_lora_into_unet + fuse_lora, as a pipeline's
load_lora_weights calls them; a test-only dependency, since nothing but diffusers can say what diffusers
reads), and the merge of the original adapter.

Tolerance: none. Converting copies A and B byte for byte and keeps the scale; every merge (PEFT's, diffusers',
lorasurgeon's) multiplies fp32 factors by the scale rounded to float32, so merged tensors must be equal
(torch.equal) and scales equal after float32 rounding (exactly equal in fp64 where the float32 kohya alpha
holds scale·r exactly). The one case where a float32 alpha cannot keep the float32 scale is tested for its
warning. Every adapter has B ≠ 0, and each equality sits beside a guard that the merge changed the base.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import metadata_of, model_class, read_tensors, run_cli, save_model, tree_hashes
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_formats_kohya import SDXL, UNET, kohya_name, save_base, save_lora
from test_formats_peft import hf_adapter, perturbed_adapter

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.formats import kohya_names, load_adapter
from lorasurgeon.formats.scale_form import scale_form
from lorasurgeon.formats.writing import peft_config_for

pytestmark = pytest.mark.oracle

SAMPLES = Path(__file__).parent.parent / "samples"
FORMATS = ("peft", "kohya", "diffusers")


def convert(adapter: Path, out: Path, to: str, **options: Any) -> lorasurgeon.ConvertSummary:
    return lorasurgeon.convert(adapter, out, to=to, **options)


def adapter_file(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path


def bits(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).tolist())


def factor_bytes(path: Path) -> list[bytes]:
    """Every tensor of an adapter file but kohya's scalar alphas, as raw bytes, in a canonical order."""
    return sorted(bits(t) for k, t in read_tensors(adapter_file(path)).items() if not k.endswith(".alpha"))


def peft_scalings(base: Path, adapter: Path, arch: str = "llama") -> tuple[dict[str, float], list[str]]:
    """Each LoRA layer's scale as PEFT computes it, and the missing/unexpected-key warnings PEFT gave loading it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(model_class(arch).from_pretrained(base, dtype=torch.float32), adapter)
    scalings = {
        name.removeprefix("base_model.model."): float(module.scaling["default"])
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    messages = [str(w.message) for w in caught]
    return scalings, [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]


def float32(values: dict[str, float]) -> dict[str, float]:
    return {k: torch.tensor(v, dtype=torch.float32).item() for k, v in values.items()}


def adapter_format(path: Path) -> str:
    adapter = load_adapter(path)
    adapter.source.close()
    return adapter.format


def merged(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    lorasurgeon.merge(base, [adapter], out)
    return read_tensors(out)


# --- round trips and merges: the same ΔW in every direction ---------------------------------------------------


@pytest.mark.parametrize("sample", ["adapter-lora", "adapter-rslora"])
def test_peft_kohya_peft_round_trip_is_bit_identical(tmp_path: Path, sample: str) -> None:
    original = SAMPLES / sample
    convert(original, tmp_path / "k.safetensors", "kohya", component="lora_unet")
    convert(tmp_path / "k.safetensors", tmp_path / "back", "peft", base=SAMPLES / "base", patterns=True)
    before, after = read_tensors(adapter_file(original)), read_tensors(adapter_file(tmp_path / "back"))
    assert before.keys() == after.keys() and all(bits(before[k]) == bits(after[k]) for k in before)
    assert before[next(iter(before))].dtype == after[next(iter(before))].dtype
    kohya = read_tensors(tmp_path / "k.safetensors")
    assert not before.keys() & kohya.keys() and all(t.dtype == torch.float32 for t in kohya.values())  # renamed
    scalings, key_warnings = peft_scalings(SAMPLES / "base", original)
    back, back_warnings = peft_scalings(SAMPLES / "base", tmp_path / "back")
    assert key_warnings == back_warnings == [] and len(scalings) == 14
    if sample == "adapter-lora":
        assert back == scalings  # integer alphas: the float32 kohya alpha holds scale·r exactly
    else:
        assert float32(back) == float32(scalings)  # rsLoRA: scale·r = α·√r rounds to float32, scale·r/r too
        assert len(set(scalings.values())) == 3  # guard: rsLoRA, rank_pattern and alpha_pattern all show


def sources(tmp_path: Path) -> dict[str, Path]:
    """samples/adapter-rslora (rsLoRA, rank and alpha patterns) in each format."""
    peft = SAMPLES / "adapter-rslora"
    convert(peft, tmp_path / "src-kohya.safetensors", "kohya", component="lora_unet")
    convert(peft, tmp_path / "src-diffusers.safetensors", "diffusers", component="unet", patterns=True)
    return {
        "peft": peft,
        "kohya": tmp_path / "src-kohya.safetensors",
        "diffusers": tmp_path / "src-diffusers.safetensors",
    }


@pytest.mark.parametrize("target", FORMATS)
@pytest.mark.parametrize("source", FORMATS)
def test_merging_the_converted_adapter_gives_the_same_tensors(tmp_path: Path, source: str, target: str) -> None:
    base = SAMPLES / "base"
    adapter = sources(tmp_path)[source]
    out = tmp_path / ("out" if target == "peft" else "out.safetensors")
    options: dict[str, Any] = {"component": "lora_unet"} if source == "peft" else {}
    summary = convert(adapter, out, target, base=base if source == "kohya" else None, patterns=True, **options)
    assert len(summary.modules) == 14 and summary.warnings == () and summary.bytes_written > 0 and not summary.folded
    assert adapter_format(out) == target
    assert factor_bytes(out) == factor_bytes(SAMPLES / "adapter-rslora")
    reference = merged(base, SAMPLES / "adapter-rslora", tmp_path / "reference")
    ours, original = merged(base, out, tmp_path / "merged"), read_tensors(base)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert sum(not torch.equal(ours[k], original[k]) for k in original) == 14  # guard: the merge did something


@pytest.mark.parametrize("via", ["kohya", "diffusers"])
def test_peft_output_loads_in_peft_without_key_warnings(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, via: str
) -> None:
    middle = tmp_path / "middle.safetensors"
    convert(llama_adapter, middle, via, component="lora_te" if via == "kohya" else "text_encoder")
    convert(middle, tmp_path / "back", "peft", base=llama_dir if via == "kohya" else None)
    scalings, key_warnings = peft_scalings(llama_dir, tmp_path / "back")
    assert key_warnings == [] and scalings == peft_scalings(llama_dir, llama_adapter)[0] and len(scalings) == 14
    from peft import PeftModel

    model = model_class("llama").from_pretrained(llama_dir, dtype=torch.float32)
    ours = PeftModel.from_pretrained(model, tmp_path / "back").merge_and_unload().state_dict()
    model = model_class("llama").from_pretrained(llama_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(model, llama_adapter).merge_and_unload().state_dict()
    base = read_tensors(llama_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not torch.equal(ours["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


def test_kohya_peft_kohya_on_an_sdxl_file_keeps_names_bytes_and_alphas(tmp_path: Path) -> None:
    """kohya names on an SDXL single file (SAI U-Net with a 3x3 conv, text encoder 1) go to PEFT module paths
    with BASE, and back to the same kohya names with BASE alone (its layout gives the prefix)."""
    base = tmp_path / "sdxl.safetensors"
    save_base(base, SDXL)
    names = {n: kohya_name("lora_unet", n, "model.diffusion_model.") for n in SDXL if n.startswith("model.")}
    te1 = [n for n in SDXL if n.startswith("conditioner.embedders.0.")]
    names |= {n: kohya_name("lora_te1", n, "conditioner.embedders.0.transformer.") for n in te1}
    save_lora(tmp_path / "k.safetensors", {k: (SDXL[n], 3.0 if "fc1" in n else None) for n, k in names.items()}, 2)
    summary = convert(tmp_path / "k.safetensors", tmp_path / "peft", "peft", base=base, patterns=True)
    assert {c.name + ".weight" for c in summary.modules} == set(names)
    convert(tmp_path / "peft", tmp_path / "k2.safetensors", "kohya", base=base)
    before, after = read_tensors(tmp_path / "k.safetensors"), read_tensors(tmp_path / "k2.safetensors")
    alphas = {k: (3.0 if "fc1" in k else 2.0) for k in after if k.endswith(".alpha")}  # missing alpha = rank
    assert {k: v.item() for k, v in after.items() if k.endswith(".alpha")} == alphas
    factors = sorted(k for k in after if not k.endswith(".alpha"))
    assert factors == sorted(k for k in before if not k.endswith(".alpha")) and len(factors) == 10
    assert all(bits(before[k]) == bits(after[k]) for k in factors)
    message = refused(
        tmp_path / "peft",
        "kohya",
        "gives this tensor no name with prefix lora_te1",
        MismatchError,
        base=base,
        component="lora_te1",
    )  # the SAI U-Net's tensors are lora_unet's
    assert "input_blocks_4_1" not in message and "model.diffusion_model." in message
    reference = merged(base, tmp_path / "k.safetensors", tmp_path / "m1.safetensors")
    ours = merged(base, tmp_path / "peft", tmp_path / "m2.safetensors")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not torch.equal(reference[next(iter(names))], read_tensors(base)[next(iter(names))])


def test_kohya_alpha_that_changes_the_float32_scale_is_reported(tmp_path: Path, llama_dir: Path) -> None:
    """rsLoRA r=6, alpha=7: scale·r = 7·√6 is no float32 number, and r is no power of two, so the float32 alpha
    moves the float32 scale by one step; the summary says so (the factors are still copied unchanged)."""
    adapter = hf_adapter(llama_dir, tmp_path / "lora", r=6, lora_alpha=7, use_rslora=True, target_modules=["q_proj"])
    summary = convert(adapter, tmp_path / "k.safetensors", "kohya", component="lora_te")
    (warning,) = summary.warnings
    stored = read_tensors(tmp_path / "k.safetensors")["lora_te_model_layers_0_self_attn_q_proj.alpha"].item()
    assert stored == torch.tensor(7 * math.sqrt(6), dtype=torch.float32).item() != 7 * math.sqrt(6)
    assert (
        "lora_te_model_layers_0_self_attn_q_proj.alpha" in warning.message and "(2 modules in all)" in warning.message
    )
    assert "changes the scale by 5.0e-08 relative" in warning.message


# --- what diffusers and PEFT themselves read ------------------------------------------------------------------


def tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )


def unet_lora(tmp_path: Path, **lora: Any) -> Path:
    tiny_unet().save_pretrained(tmp_path / "unet")
    return perturbed_adapter(tiny_unet(), tmp_path / "unet-lora", r=4, lora_alpha=6, **lora)


def peft_unet(adapter: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """PEFT's own scales and merge_and_unload of a PEFT adapter on the tiny U-Net."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(tiny_unet(), adapter)
    scalings = {
        n.removeprefix("base_model.model."): m.scaling["default"]
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    return scalings, model.merge_and_unload().state_dict()


def diffusers_unet(lora_file: Path) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """diffusers' scales and fused weights for a LoRA file, loaded the way StableDiffusionPipeline does."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    state_dict, alphas, metadata = Loader.lora_state_dict(str(lora_file), return_lora_metadata=True)
    unet = tiny_unet()
    Loader.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, metadata=metadata, adapter_name="x")
    scalings = {n: m.scaling["x"] for n, m in unet.named_modules() if "x" in getattr(m, "scaling", {})}
    unet.fuse_lora(adapter_names=["x"])
    unet.unload_lora()
    return scalings, unet.state_dict()


DIFFUSERS_CASES = {
    "rslora+patterns+conv": {
        "use_rslora": True,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
        "rank_pattern": {"to_k": 2},
        "alpha_pattern": {"to_v": 3},
    },
    "dora": {"use_dora": True, "target_modules": ["to_q", "to_v", "proj_in"]},
    "lora_bias": {"lora_bias": True, "target_modules": ["proj_in", "to_out.0", "ff.net.2"]},
}


@pytest.mark.parametrize(
    ("case", "via"), [*((case, "peft") for case in DIFFUSERS_CASES), ("rslora+patterns+conv", "kohya")]
)  # kohya files hold no DoRA magnitudes or LoRA biases (their refusals are tested below)
def test_diffusers_output_loads_in_diffusers(tmp_path: Path, case: str, via: str) -> None:
    adapter = unet_lora(tmp_path, **DIFFUSERS_CASES[case])
    source = adapter
    if via == "kohya":
        source = tmp_path / "k.safetensors"
        convert(adapter, source, "kohya", component="lora_unet")
    base = tmp_path / "unet" if via == "kohya" else None
    convert(
        source, tmp_path / "pytorch_lora_weights.safetensors", "diffusers", component="unet", base=base, patterns=True
    )
    want_scalings, want = peft_unet(adapter)
    scalings, fused = diffusers_unet(tmp_path / "pytorch_lora_weights.safetensors")
    expect = float32 if via == "kohya" else dict  # kohya's float32 alpha: equal after float32 rounding
    assert expect(scalings) == expect(want_scalings) and len(scalings) >= 10
    assert fused.keys() == want.keys() and all(torch.equal(fused[k], want[k]) for k in want)
    base_weights = tiny_unet().state_dict()
    assert sum(not torch.equal(want[k], base_weights[k]) for k in want) >= 10  # guard: the LoRA changed them


def test_kohya_output_loads_in_diffusers_kohya_reader(tmp_path: Path) -> None:
    """diffusers' own kohya converter (names repaired from `_`, alphas to network_alphas) reads our kohya file as
    PEFT reads the source. One alpha throughout: diffusers 0.42 drops per-module alphas of attention layers
    (their alpha_pattern keys keep its old `processor.to_k_lora` names and match nothing)."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "ff.net.2"]
    adapter = unet_lora(tmp_path, target_modules=targets, rank_pattern={"to_k": 2, "conv1": 3})
    convert(adapter, tmp_path / "k.safetensors", "kohya", component="lora_unet")
    metadata = metadata_of(tmp_path / "k.safetensors")
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "Dynamic"
    assert metadata["ss_network_alpha"] == "6.0" and json.loads(metadata["ss_network_args"])["conv_dim"] == "Dynamic"
    want_scalings, want = peft_unet(adapter)
    scalings, fused = diffusers_unet(tmp_path / "k.safetensors")
    assert scalings == want_scalings and len(set(scalings.values())) == 3  # guard: three ranks, three scales
    assert all(torch.equal(fused[k], want[k]) for k in want)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["proj_out", "blocks.0.proj_out", "a.to_q", "b.a.to_q", "c.to_k", "d.c.to_k"]),
            st.integers(1, 16),
            st.one_of(st.integers(1, 64).map(float), st.floats(0.01, 100, allow_nan=False)),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda m: m[0],
    ),
    st.booleans(),
    st.booleans(),
)
def test_config_gives_every_module_its_rank_and_scale(
    modules: list[tuple[str, int, float]], rslora: bool, patterns: bool
) -> None:
    """Resolved by PEFT's own pattern matching, the config gives every module its rank and exactly its scale in
    the patterns form, even where one path is a dotted suffix of another (`proj_out`, `blocks.0.proj_out`); in the
    single-alpha form one lora_alpha, no alpha_pattern and no rsLoRA give it its scale times the fold cᵢ."""
    from peft.utils.other import get_pattern_key

    from lorasurgeon.adapter import LoraModule

    adapter = load_adapter(SAMPLES / "adapter-lora")
    adapter.source.close()
    info = adapter.modules[0].a  # any tensor: the config reads no factor
    loras = [LoraModule(path, info, info, r, a, a / math.sqrt(r) if rslora else a / r, False) for path, r, a in modules]
    form = scale_form([m.module for m in loras], [(m.rank, m.alpha, m.scale) for m in loras], patterns=patterns)
    config = peft_config_for(loras, form)
    if not patterns:
        assert config["alpha_pattern"] == {} and not config["use_rslora"]
    for m, factor in zip(loras, form.factors, strict=True):
        rank = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), m.module), config["r"])
        alpha = config["alpha_pattern"].get(
            get_pattern_key(config["alpha_pattern"].keys(), m.module), config["lora_alpha"]
        )
        scale = alpha / math.sqrt(rank) if config["use_rslora"] else alpha / rank  # LoraLayer.update_layer
        assert rank == m.rank and m.module in config["target_modules"]
        if patterns:
            assert scale == m.scale and factor == 1.0, m.module
        else:
            assert scale * factor == pytest.approx(m.scale, rel=1e-15), m.module


# --- refusals: each names the tensor and the reason, and writes nothing ---------------------------------------


def refused(adapter: Path, to: str, match: str, error: type[Exception] = UnsupportedError, **options: Any) -> str:
    out = adapter.parent / ("refused" if to == "peft" else "refused.safetensors")
    before, listing = tree_hashes(adapter), sorted(adapter.parent.iterdir())
    with pytest.raises(error, match=match) as caught:
        lorasurgeon.convert(adapter, out, to=to, **options)
    assert not out.exists() and sorted(adapter.parent.iterdir()) == listing and tree_hashes(adapter) == before
    return str(caught.value)


CANNOT = [
    ("kohya", {"use_dora": True}, "q_proj.lora_magnitude_vector", "is a DoRA magnitude"),
    ("kohya", {"lora_bias": True}, "q_proj.lora_B.bias", "kohya files have no LoRA bias"),
    ("kohya", {"target_modules": ["embed_tokens"]}, "embed_tokens.lora_embedding_A", "kohya files have no embedding"),
    ("diffusers", {"target_modules": ["embed_tokens"]}, "embed_tokens.lora_embedding_A", "adapt no embeddings"),
    ("kohya", {"modules_to_save": ["lm_head"]}, "base_model.model.lm_head.weight", "hold LoRA factors only"),
    ("diffusers", {"modules_to_save": ["lm_head"]}, "base_model.model.lm_head.weight", "without 'lora' in it"),
    ("kohya", {"trainable_token_indices": [1, 2]}, "trainable_tokens_delta", "holds trainable token rows"),
    ("diffusers", {"trainable_token_indices": [1, 2]}, "trainable_tokens_delta", "without 'lora' in it"),
]


@pytest.mark.parametrize(("to", "fields", "tensor", "reason"), CANNOT, ids=[f"{c[0]}-{c[3]}" for c in CANNOT])
def test_refuses_what_the_target_cannot_hold(
    tmp_path: Path, llama_dir: Path, to: str, fields: dict[str, Any], tensor: str, reason: str
) -> None:
    lora = {"target_modules": ["q_proj"], **fields}
    adapter = hf_adapter(llama_dir, tmp_path / "adapter" / "lora", r=2, **lora)
    message = refused(adapter, to, reason, component="lora_unet")
    assert tensor in message and "nothing was converted" in message


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_refuses_conv1d_modules_outside_peft(tmp_path: Path, to: str) -> None:
    base = save_model(tmp_path / "base", arch="gpt2")
    adapter = hf_adapter(
        base, tmp_path / "a" / "lora", arch="gpt2", r=2, fan_in_fan_out=True, target_modules=["c_attn"]
    )
    message = refused(adapter, to, "transformers Conv1D LoRA", component="unet")
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in message and "(and 1 more tensors" in message


def test_kohya_needs_base_to_become_module_paths(tmp_path: Path) -> None:
    convert(SAMPLES / "adapter-lora", tmp_path / "k.safetensors", "kohya", component="lora_unet")
    message = refused(tmp_path / "k.safetensors", "peft", "cannot be turned back", LorasurgeonError)
    assert "lora_unet_model_layers_0_mlp_down_proj.lora_down.weight" in message and "pass base=…" in message


@pytest.mark.parametrize(
    ("to", "words"), [("kohya", "kohya names start with the component"), ("diffusers", "under its pipeline component")]
)
def test_peft_needs_a_component_outside_peft(tmp_path: Path, to: str, words: str) -> None:
    shutil.copytree(SAMPLES / "adapter-lora", tmp_path / "lora")
    assert "pass component=…" in refused(tmp_path / "lora", to, words, LorasurgeonError)


def test_kohya_prefix_from_base_can_be_ambiguous(tmp_path: Path) -> None:
    """A diffusers-layout component file allows every prefix (lora_unet, lora_te, ...): --component decides."""
    shutil.copytree(SAMPLES / "adapter-lora", tmp_path / "lora")
    message = refused(tmp_path / "lora", "kohya", "BASE's layout allows", LorasurgeonError, base=SAMPLES / "base")
    assert "lora_unet_model_layers_0_mlp_down_proj" in message and "pass component=…" in message
    summary = convert(
        tmp_path / "lora", tmp_path / "k.safetensors", "kohya", base=SAMPLES / "base", component="lora_te1"
    )
    assert summary.modules[0].name == "lora_te1_model_layers_0_mlp_down_proj"


def test_diffusers_components_one_at_a_time_to_peft(tmp_path: Path) -> None:
    convert(SAMPLES / "adapter-lora", tmp_path / "d.safetensors", "diffusers", component="unet")
    tensors = read_tensors(tmp_path / "d.safetensors")
    tensors |= {"text_encoder." + k.partition(".")[2]: t.clone() for k, t in tensors.items()}  # a second component
    save_file(tensors, tmp_path / "two.safetensors", metadata=metadata_of(tmp_path / "d.safetensors"))
    message = refused(tmp_path / "two.safetensors", "peft", "a PEFT adapter is for one model", LorasurgeonError)
    assert "text_encoder and unet" in message and "pass component=…" in message
    summary = convert(tmp_path / "two.safetensors", tmp_path / "unet-only", "peft", component="unet")
    (left_out,) = summary.warnings
    assert len(summary.modules) == 14 and len(summary.left_out) == 28
    assert left_out.message.startswith("text_encoder.model.layers.0.mlp.down_proj.lora_A.weight: left out")


def test_kohya_components_the_base_lacks_need_component(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    unet_module = kohya_name("lora_unet", next(iter(UNET)))
    te_module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_lora(tmp_path / "k.safetensors", {unet_module: ((32, 32), 8.0), te_module: ((24, 24), 4.0)})
    message = refused(
        tmp_path / "k.safetensors", "diffusers", "holds no tensor for it", MismatchError, base=tmp_path / "unet"
    )
    assert f"{te_module}.lora_down.weight" in message and "pass component=…" in message
    summary = convert(
        tmp_path / "k.safetensors",
        tmp_path / "d.safetensors",
        "diffusers",
        base=tmp_path / "unet",
        component="lora_unet",
    )
    assert [c.name for c in summary.modules] == [f"unet.{next(iter(UNET)).removesuffix('.weight')}"]
    assert f"{te_module}.lora_down.weight" in summary.left_out


def test_kohya_sai_unet_names_are_no_diffusers_paths(tmp_path: Path) -> None:
    save_base(tmp_path / "sdxl.safetensors", SDXL)
    unet = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    te1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    modules = {
        kohya_name("lora_unet", unet, "model.diffusion_model."): (SDXL[unet], 2.0),
        kohya_name("lora_te1", te1, "conditioner.embedders.0.transformer."): (SDXL[te1], 2.0),
    }
    save_lora(tmp_path / "k.safetensors", modules)
    base = tmp_path / "sdxl.safetensors"
    message = refused(tmp_path / "k.safetensors", "diffusers", "SAI names", base=base)
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in message
    summary = convert(
        tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers", base=base, component="lora_te1"
    )
    assert [c.name for c in summary.modules] == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]


def test_kohya_prefix_without_a_diffusers_component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sd-scripts' Flux T5 prefix lora_te3 has no diffusers component; no table here resolves it yet, so the test
    lets a component file's names carry it."""
    monkeypatch.setitem(kohya_names.LAYOUT_PREFIXES, "", ("lora_te3",))
    name = "lora_te3_model_layers_0_self_attn_q_proj"
    save_lora(tmp_path / "k.safetensors", {name: ((64, 64), 8.0)})
    message = refused(tmp_path / "k.safetensors", "diffusers", "names no diffusers component", base=SAMPLES / "base")
    assert f"{name}.lora_down.weight" in message and "lora_te3" in message


def test_unknown_format_component_and_empty_selection(tmp_path: Path) -> None:
    shutil.copytree(SAMPLES / "adapter-lora", tmp_path / "lora")
    refused(tmp_path / "lora", "lycoris", "to='lycoris': expected one of peft, kohya, diffusers", LorasurgeonError)
    refused(tmp_path / "lora", "kohya", "component='vae': expected one of", LorasurgeonError, component="vae")
    convert(tmp_path / "lora", tmp_path / "d.safetensors", "diffusers", component="unet")
    message = refused(tmp_path / "d.safetensors", "peft", "selects no module", LorasurgeonError, component="lora_te2")
    assert "component='lora_te2'" in message and "the adapter has unet" in message


def test_transformer_components_have_no_kohya_prefix(tmp_path: Path) -> None:
    convert(SAMPLES / "adapter-lora", tmp_path / "d.safetensors", "diffusers", component="transformer")
    message = refused(tmp_path / "d.safetensors", "kohya", "has no kohya prefix")
    assert "transformer.model.layers.0.mlp.down_proj.lora_A.weight" in message


def test_two_modules_with_one_kohya_name(tmp_path: Path) -> None:
    """`_` stands for `.`: paths a.b_c and a_b.c are one kohya name."""
    torch.manual_seed(0)
    tensors = {
        f"base_model.model.{path}.{part}.weight": torch.randn(2, 4) if part == "lora_A" else torch.randn(4, 2)
        for path in ("a.b_c", "a_b.c")
        for part in ("lora_A", "lora_B")
    }
    (tmp_path / "x").mkdir()
    save_file(tensors, tmp_path / "x" / "lora.safetensors")
    message = refused(
        tmp_path / "x" / "lora.safetensors",
        "kohya",
        "would both be named lora_unet_a_b_c",
        alpha=2,
        component="lora_unet",
    )
    assert "a.b_c.lora_A.weight and base_model.model.a_b.c.lora_A.weight" in message


def test_full_tensors_without_a_config_to_peft(tmp_path: Path) -> None:
    """A bare PEFT file (scale from --alpha) with a full lm_head: no config says it is a modules_to_save entry."""
    tensors = read_tensors(SAMPLES / "adapter-lora" / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.randn(128, 64)
    (tmp_path / "x").mkdir()
    save_file(tensors, tmp_path / "x" / "lora.safetensors")
    message = refused(tmp_path / "x" / "lora.safetensors", "peft", "nothing says which modules_to_save", alpha=16)
    assert "base_model.model.lm_head.weight replaces a base tensor in full" in message


def test_peft_modules_must_resolve_against_base(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    shutil.copytree(SAMPLES / "adapter-lora", tmp_path / "lora")
    message = refused(
        tmp_path / "lora", "kohya", "is not in the base checkpoint", MismatchError, base=tmp_path / "unet"
    )
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in message


# --- the command line ------------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    return run_cli([str(a) for a in args], capsys)


def test_cli_convert_json_and_dry_run(capsys: pytest.CaptureFixture[str], work: Path) -> None:
    code, out, err = run(
        capsys, "convert", SAMPLES / "adapter-rslora", "--to", "kohya", "--component", "lora_unet", "--json"
    )
    doc = json.loads(out)
    assert code == 0 and err == "" and doc["from"] == "peft" and doc["to"] == "kohya" and len(doc["modules"]) == 14
    assert doc["output"] == "adapter-rslora-kohya.safetensors" and (work / doc["output"]).is_file()  # default OUT
    assert {m["target"] for m in doc["modules"]} >= {"lora_unet_model_layers_1_self_attn_o_proj"}
    code, out, err = run(capsys, "convert", doc["output"], "--to", "peft", "--base", SAMPLES / "base", "--dry-run")
    assert code == 0 and out == "" and "model.layers.1.self_attn.o_proj" in err and "would write" in err
    assert sorted(p.name for p in work.iterdir()) == ["adapter-rslora-kohya.safetensors"]


@pytest.mark.parametrize(
    ("source", "args", "words"),
    [
        ("KOHYA", ["--to", "peft"], "pass --base"),
        ("KOHYA", ["--to", "kohya", "-o", "k"], "writes one .safetensors file"),
        ("KOHYA", ["--to", "kohya", "-o", "KOHYA", "--force"], "may not be an input"),
        ("SAMPLE", ["--to", "kohya", "--component", "lora_unet", "-o", "KOHYA"], "already exists"),
        ("KOHYA", ["--to", "lycoris"], "Invalid value for '--to'"),
    ],
    ids=["kohya-without-base", "out-suffix", "out-is-input", "out-exists", "bad-format"],
)
def test_cli_errors_exit_2_and_write_nothing(
    capsys: pytest.CaptureFixture[str], work: Path, source: str, args: list[str], words: str
) -> None:
    convert(SAMPLES / "adapter-lora", work / "k.safetensors", "kohya", component="lora_unet")
    paths = {"KOHYA": str(work / "k.safetensors"), "SAMPLE": str(SAMPLES / "adapter-lora")}
    before = tree_hashes(work)
    code, out, err = run(capsys, "convert", paths[source], *[paths.get(a, a) for a in args])
    assert code == 2 and out == "" and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or "Usage:" in err
    assert tree_hashes(work) == before and sorted(p.name for p in work.iterdir()) == ["k.safetensors"]
