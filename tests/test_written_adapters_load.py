"""Every adapter lorasurgeon writes loads everywhere without help: PEFT finds exactly its keys (none missing, none
unexpected) on every architecture, and AutoPeftModel builds the base it names, from the task type of its
architecture or, without one, PEFT's auto_mapping."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import save_adapter
from safetensors import safe_open
from tiny_models import ARCHS, CLIP, Arch, forward, load, save_base

import lorasurgeon

pytestmark = pytest.mark.oracle

EXTRACTED = {**{k: ARCHS[k] for k in ("llama", "gpt2", "t5", "bert-mlm", "whisper")}, "clip": CLIP}


def save_tuned(arch: Arch, base: Path, path: Path) -> Path:
    """BASE with a rank-2 change of every trainable 2-D weight (embeddings too), as a full fine-tune leaves it."""
    generator = torch.Generator().manual_seed(3)
    model = load(arch, base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Whisper's encoder positions are fixed sinusoids, never trained (and PEFT's Embedding LoRA lacks the
            # num_embeddings its forward reads)
            if param.dim() == 2 and min(param.shape) >= 2 and name != "model.encoder.embed_positions.weight":
                u, v = (
                    torch.randn(param.shape[0], 2, generator=generator),
                    torch.randn(2, param.shape[1], generator=generator),
                )
                param += 0.05 * u @ v
    model.save_pretrained(path)
    return path


def adapter_keys(adapter: Path) -> set[str]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        return set(f.keys())


def peft_keys(arch: Arch, base: Path, adapter: Path) -> set[str]:
    """The keys PEFT's model for the adapter's config holds (what it would save), read back after loading."""
    from peft import PeftModel, get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Found missing adapter keys" is a UserWarning
        warnings.filterwarnings("ignore", message=".*(tie|tied|fan_in_fan_out).*")
        model = PeftModel.from_pretrained(load(arch, base), adapter)
    return set(get_peft_model_state_dict(model, save_embedding_layers=False))


def auto_peft(adapter: Path) -> Any:
    """AutoPeftModel… for the task type the adapter states (AutoPeftModel itself without one)."""
    import peft

    task = json.loads((adapter / "adapter_config.json").read_text()).get("task_type")
    name = {None: "AutoPeftModel", "CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(peft, name[task]).from_pretrained(adapter).eval()


@pytest.mark.parametrize("arch_id", sorted(EXTRACTED))
@pytest.mark.parametrize("embeddings", [False, True], ids=["default", "include-embeddings"])
def test_extracted_adapter_loads_everywhere(tmp_path: Path, arch_id: str, embeddings: bool) -> None:
    arch = EXTRACTED[arch_id]
    base = save_base(arch, tmp_path / "base")
    tuned = save_tuned(arch, base, tmp_path / "tuned")
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", rank=2, include_embeddings=embeddings)
    kinds = {m.kind for m in summary.matrices}
    assert kinds == ({"linear", "embedding"} if embeddings else {"linear"})
    assert peft_keys(arch, base, tmp_path / "lora") == adapter_keys(tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    model = auto_peft(tmp_path / "lora")
    assert type(model.get_base_model()).__name__ == arch.model
    assert not torch.allclose(forward(model, arch), forward(load(arch, base), arch), atol=1e-4)  # the adapter is on


def test_extract_records_the_name_given(tmp_path: Path) -> None:
    arch = ARCHS["llama"]
    base = save_base(arch, tmp_path / "base")
    tuned = save_tuned(arch, base, tmp_path / "tuned")
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", rank=2, base_name="org/tiny-llama")
    assert summary.config["base_model_name_or_path"] == "org/tiny-llama" and summary.config["task_type"] == "CAUSAL_LM"


def test_converted_peft_adapter_loads_with_auto_peft(tmp_path: Path, llama_dir: Path) -> None:
    """kohya -> PEFT (with --base) names the base and its task type, so AutoPeftModelForCausalLM loads it; from
    PEFT a source's own base name is kept unless a name is given."""
    adapter = save_adapter(llama_dir, tmp_path / "lora", r=2, target_modules=["q_proj", "v_proj"])
    lorasurgeon.convert(adapter, tmp_path / "k.safetensors", to="kohya", component="lora_te")
    summary = lorasurgeon.convert(tmp_path / "k.safetensors", tmp_path / "back", to="peft", base=llama_dir)
    assert summary.config is not None
    assert (summary.config["base_model_name_or_path"], summary.config["task_type"]) == (str(llama_dir), "CAUSAL_LM")
    model = auto_peft(tmp_path / "back")
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
    named = lorasurgeon.convert(adapter, tmp_path / "named", to="peft", base_name="org/tiny-llama")
    assert named.config is not None and named.config["base_model_name_or_path"] == "org/tiny-llama"


def test_converted_unet_adapter_takes_its_component_from_the_base(tmp_path: Path) -> None:
    """`--base unet/` says the component: no --component needed, to diffusers or to kohya; to PEFT, the diffusers
    class goes into auto_mapping, and AutoPeftModel builds the U-Net."""
    from test_convert import unet_lora

    adapter = unet_lora(tmp_path, target_modules=["to_q", "to_k", "proj_in"])
    unet = tmp_path / "unet"
    d = lorasurgeon.convert(adapter, tmp_path / "d.safetensors", to="diffusers", base=unet)
    k = lorasurgeon.convert(adapter, tmp_path / "k.safetensors", to="kohya", base=unet)
    assert all(m.name.startswith("unet.") for m in d.modules) and all(
        m.name.startswith("lora_unet_") for m in k.modules
    )
    back = lorasurgeon.convert(tmp_path / "k.safetensors", tmp_path / "back", to="peft", base=unet)
    assert back.config is not None and back.config["auto_mapping"]["base_model_class"] == "UNet2DConditionModel"
    model = auto_peft(tmp_path / "back")
    assert type(model.get_base_model()).__name__ == "UNet2DConditionModel"
