"""PEFT's saved copies of base weights (`<module>.base_layer.weight`, which save_pretrained writes for embeddings
under a LoRA): merge starts from them, as PEFT's load does, and unmerge gives them back, checked against them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from builders import read_tensors, save_adapter, save_model
from safetensors import safe_open

import lorasurgeon
from lorasurgeon.errors import MismatchError

pytestmark = pytest.mark.oracle

EMBEDDING = "model.embed_tokens.weight"


def embedding_adapter(base: Path, path: Path, seed: int = 1) -> Path:
    with warnings.catch_warnings():  # PEFT says it saves the embedding layers: that is the point
        warnings.simplefilter("ignore")
        adapter = save_adapter(base, path, seed=seed, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in set(f.keys())
    return adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unmerge_gives_back_the_saved_base(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_model(tmp_path / "base", dtype=dtype)
    adapter = embedding_adapter(base, tmp_path / "lora")
    lorasurgeon.merge(base, [adapter], tmp_path / "merged")
    merged = read_tensors(tmp_path / "merged")
    assert not torch.equal(merged[EMBEDDING], read_tensors(base)[EMBEDDING])
    summary = lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "unmerged")
    assert any(s.expected is not None for s in summary.plan.steps)
    original, restored = read_tensors(base)[EMBEDDING], read_tensors(tmp_path / "unmerged")[EMBEDDING]
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    delta = (merged[EMBEDDING].double() - original.double()).abs()
    assert ((restored.double() - original.double()).abs() <= 2 * unit * (original.double().abs() + delta)).all()


def test_unmerge_of_another_merge_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    """merged − ΔW that is not the saved base means MERGED was made with something else: said, naming the tensor."""
    adapter = embedding_adapter(llama_dir, tmp_path / "lora")
    other = embedding_adapter(llama_dir, tmp_path / "other", seed=5)
    lorasurgeon.merge(llama_dir, [other], tmp_path / "merged")
    with pytest.raises(
        MismatchError, match=rf"{EMBEDDING} minus the adapter's ΔW differs from .*embed_tokens.base_layer"
    ):
        lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
