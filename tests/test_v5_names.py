"""PEFT adapters speak transformers-5 in-memory names; checkpoints hold legacy ones (ViT's attention.query, LLaVA's
language_model.model, Gemma 3 and SigLIP towers' vision_model, Qwen2-VL's visual) or only a tied tensor (BART's
decoder embed_tokens and lm_head, Whisper's proj_out). `lorasurgeon merge` resolves them through
transformers_names, and unties what the adapter changes.

The oracle: PEFT's own forward of the adapter on the model transformers loads from BASE equals the forward of
`from_pretrained(OUT)`, for each family and each layout its checkpoints come in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from moe_models import LEGACY_PREFIXES, named_model, randomized, save_layout

import lorasurgeon

pytestmark = pytest.mark.oracle
TOKENS = torch.tensor([[3, 7, 1, 9, 4, 2]])
# family -> PEFT target_modules (memory names: suffixes), one of each renamed kind of module where it has them.
TARGETS: dict[str, list[str]] = {
    "vit": ["q_proj", "fc1", "classifier"],
    "llava": ["q_proj", "fc1", "linear_1"],
    "gemma3": ["q_proj", "fc1"],
    "qwen2_vl": ["q_proj", "qkv"],
    "bart": ["q_proj", "model.decoder.embed_tokens"],
    "whisper": ["q_proj", "proj_out"],
    "siglip_vision": ["head.mlp.fc1", "q_proj"],
    "clip_text": ["q_proj", "fc2"],
}


def inputs(family: str, model: Any) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if family in ("vit", "siglip_vision"):
        return {"pixel_values": torch.randn(1, 3, 16, 16, generator=generator)}
    if family == "whisper":
        frames = 2 * model.config.max_source_positions
        return {"input_features": torch.randn(1, 8, frames, generator=generator), "decoder_input_ids": TOKENS}
    if family == "bart":
        return {"input_ids": TOKENS, "decoder_input_ids": TOKENS}
    return {"input_ids": TOKENS}


def forward(model: Any, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs(family, model))
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def loaded(directory: Path, like: Any) -> Any:
    return type(like).from_pretrained(directory, dtype=torch.float32)


CASES = [
    (f, layout)
    for f in TARGETS
    for layout in ("saved", "memory", "legacy")
    if layout != "legacy" or f in LEGACY_PREFIXES
]


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_merge_resolves_in_memory_names(family: str, layout: str, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model = randomized(named_model(family))
    base = save_layout(model, tmp_path / "base", layout, family)  # type: ignore[arg-type]
    peft_model = get_peft_model(loaded(base, model), LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS[family]))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = forward(peft_model, family)
    summary = lorasurgeon.merge(base, [tmp_path / "adapter"], tmp_path / "out")
    assert summary.changed >= 2
    got = forward(loaded(tmp_path / "out", model), family)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(forward(loaded(base, model), family), want, atol=1e-3)  # guard: the adapter acts
    written, original = read_tensors(tmp_path / "out"), read_tensors(base)
    assert original.keys() <= written.keys()  # the base's layout is kept; untied tensors are added beside it
