"""Build the shipped samples: a tiny Llama-style base and two PEFT adapters trained on it for a few steps.

    python samples/make_samples.py          # needs the test extras (transformers, peft)

Outputs (committed, a few hundred KB): samples/base/ (HF directory, bf16), samples/adapter-lora/ (r=8 on
all seven projections), samples/adapter-rslora/ (rsLoRA, r=8 with a rank_pattern and an alpha_pattern).
Seeded, so running it again reproduces the same files on the same torch/transformers/peft versions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(out: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def train_adapter(base: Path, out: Path, config: LoraConfig, seed: int, steps: int = 30) -> None:
    """A few AdamW steps of next-token prediction on a fixed random sequence, so B is really trained."""
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 256, (4, 32))
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def main() -> None:
    for name in ("base", "adapter-lora", "adapter-rslora"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    build_base(HERE / "base")
    train_adapter(HERE / "base", HERE / "adapter-lora", LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS), 1)
    rslora = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=PROJECTIONS,
        rank_pattern={"mlp.down_proj": 4},
        alpha_pattern={"self_attn.o_proj": 32},
    )
    train_adapter(HERE / "base", HERE / "adapter-rslora", rslora, 2)
    for readme in HERE.glob("adapter-*/README.md"):
        readme.unlink()  # PEFT's model-card template; nothing of ours


if __name__ == "__main__":
    main()
