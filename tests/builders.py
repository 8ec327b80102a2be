"""Tiny real models and adapters for the tests, built with transformers + peft (seeded, never downloaded).

Every adapter has B != 0 (init_lora_weights=False), so a merge that does nothing cannot pass a test.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError

LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_class(arch: str) -> Any:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}[arch]


def save_model(
    path: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A seeded random model saved with save_pretrained (sharded when max_shard_size is given)."""
    from transformers import GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA, **overrides}) if arch == "llama" else GPT2Config(**{**GPT2, **overrides})
    model = model_class(arch)(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def save_adapter(model_dir: Path, path: Path, arch: str = "llama", seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32)
    lora.setdefault("target_modules", PROJECTIONS if arch == "llama" else ["c_attn", "c_proj", "c_fc"])
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # larger B than PEFT's init, so deltas are well above rounding
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(path)
    return path


def peft_merged(model_dir: Path, adapter_dir: Path, arch: str = "llama") -> dict[str, torch.Tensor]:
    """The oracle: PEFT's merge_and_unload() on the base loaded in fp32, as a state dict."""
    from peft import PeftModel

    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, index or directory, read with the safetensors library."""
    path = Path(path)
    if path.is_dir():
        index = next(iter(sorted(path.glob("*.safetensors.index.json"))), None)  # glob exhausted: no open scandir
        files = (
            [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            if index
            else sorted(path.glob("*.safetensors"))
        )
    else:
        files = [path]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = f.get_tensor(key)
    return out


def metadata_of(file: Path) -> dict[str, str]:
    with safe_open(file, "pt") as f:
        return f.metadata() or {}


def tree_hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths`: compare before/after to prove inputs were not modified."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def logits(model_dir: Path, arch: str = "llama", tokens: torch.Tensor | None = None) -> torch.Tensor:
    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = tokens if tokens is not None else torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=tokens).logits


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`lorasurgeon ARGS` in this process through the real entry point: (exit code, stdout, stderr)."""
    from lorasurgeon.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def refused(base: Path, adapter: Path, out: Path, match: str, operation: str = "merge", **kwargs: Any) -> str:
    """Run a refused `operation`; assert it wrote nothing and left the inputs' bytes alone; return the message."""
    before = tree_hashes(base, adapter)
    with pytest.raises(LorasurgeonError, match=match) as error:
        getattr(lorasurgeon, operation)(base, [adapter] if operation == "merge" else adapter, out, **kwargs)
    assert not out.exists() and tree_hashes(base, adapter) == before
    return str(error.value)
