"""Build the shipped samples: a tiny Llama-style base and two PEFT adapters trained on it for a few steps.

    python samples/make_samples.py          # needs the test extras (transformers, peft)

Outputs (committed, a few hundred KB): samples/base/ (HF directory, bf16), samples/adapter-lora/ (r=8 on
all seven projections), samples/adapter-rslora/ (rsLoRA, r=8 with a rank_pattern and an alpha_pattern), and an
MoE + FP8 pair: samples/moe-fp8-base/ (a tiny DeepSeek-V3, two layers, the second with four routed experts
stored per expert, every projection FP8 e4m3 with 16×16 block scales as DeepSeek ships them) and
samples/moe-fp8-adapter/ (r=4 on the MLA projections and, through target_parameters, on the fused experts;
trained on transformers' dequantized load of the base). Seeded, so running it again reproduces the same files
on the same torch/transformers/peft versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig, LlamaForCausalLM

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
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 256, (4, 32))
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)


def main() -> None:
    for name in ("base", "adapter-lora", "adapter-rslora", "moe-fp8-base", "moe-fp8-adapter"):
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
    build_moe_fp8(HERE / "moe-fp8-base")
    moe = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_a_proj", "kv_b_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    train_adapter(HERE / "moe-fp8-base", HERE / "moe-fp8-adapter", moe, 3, steps=60)
    for readme in HERE.glob("*adapter*/README.md"):
        readme.unlink()  # PEFT's model-card template; nothing of ours


def build_moe_fp8(out: Path, block: int = 16) -> None:
    """A tiny DeepSeek-V3 (layer 0 dense, layer 1 four routed experts and a shared one), saved per expert as
    save_pretrained writes it, every projection then quantized to FP8 blocks by lorasurgeon.fp8 (DeepSeek's
    formula) with config.json's quantization_config as DeepSeek's checkpoints have it."""
    from lorasurgeon import fp8

    torch.manual_seed(4)
    mla = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}
    routing = {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1}
    config = DeepseekV3Config(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=256, max_position_embeddings=128, n_group=1, topk_group=1,
        tie_word_embeddings=False, **mla, **routing,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    stored = {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight") and "embed" not in name:
            stored[name], stored[f"{name}_scale_inv"] = fp8.quantize_blocks(tensor.float(), (block, block))
        else:
            stored[name] = tensor
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((out / "config.json").read_text())
    settings["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n")


if __name__ == "__main__":
    main()
