"""MoE merge benchmark of issue 13: `lorasurgeon merge` of a PEFT target_parameters adapter (LoRA on the fused
experts, PEFT >= 0.18) into a per-expert checkpoint with 64 experts per layer, against a plain copy of the files.

    python bench/moe_merge.py [--layers 2] [--experts 64] [--repeat 3] [--device cpu|cuda] [--tmp /tmp]

Builds, in a temporary directory removed afterwards, a Qwen2-MoE-shaped bf16 checkpoint (Qwen1.5-MoE-A2.7B
geometry: hidden 2048, 16 heads, 64 routed experts of intermediate 1408, a shared expert of 5632; ~1.1 GB per
layer) stored per expert as save_pretrained writes it (`mlp.experts.N.gate_proj.weight`), and an r=16 adapter
(fp32, B != 0) on q/k/v/o_proj and on the fused `mlp.experts.gate_up_proj` and `mlp.experts.down_proj` (A is
(r·E, in): every one of the 3·E expert tensors of a layer takes a slice of one factor pair). Contenders run in
fresh processes as in bench/merge.py (same launcher: wall time and the command's own peak RSS, fsync'd outputs,
`sync` before each). The first repeat's output is checked: three expert tensors of every layer within 1 bf16
ulp of fp32 W + scale·B_e A_e rounded once (independently sliced here), the router and norms bit-equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import stack_bench, ulps

HIDDEN, EXPERT, SHARED, HEADS, VOCAB = 2048, 1408, 5632, 16, 1024
RANK, ALPHA = 16, 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def layer_tensors(layer: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of one Qwen2-MoE decoder layer as save_pretrained writes it (per-expert experts)."""
    prefix = f"model.layers.{layer}"
    out: list[tuple[str, tuple[int, ...]]] = [(f"{prefix}.self_attn.{p}.weight", (HIDDEN, HIDDEN)) for p in ATTENTION]
    for e in range(experts):
        out += [
            (f"{prefix}.mlp.experts.{e}.gate_proj.weight", (EXPERT, HIDDEN)),
            (f"{prefix}.mlp.experts.{e}.up_proj.weight", (EXPERT, HIDDEN)),
            (f"{prefix}.mlp.experts.{e}.down_proj.weight", (HIDDEN, EXPERT)),
        ]
    out += [
        (f"{prefix}.mlp.gate.weight", (experts, HIDDEN)),
        (f"{prefix}.mlp.shared_expert.gate_proj.weight", (SHARED, HIDDEN)),
        (f"{prefix}.mlp.shared_expert.up_proj.weight", (SHARED, HIDDEN)),
        (f"{prefix}.mlp.shared_expert.down_proj.weight", (HIDDEN, SHARED)),
        (f"{prefix}.mlp.shared_expert_gate.weight", (1, HIDDEN)),
        (f"{prefix}.input_layernorm.weight", (HIDDEN,)),
        (f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)),
    ]
    return out


def write_base(root: Path, layers: int, experts: int) -> None:
    """One shard per layer (~1.1 GB each), the embeddings and norm in the first, an index and config.json."""
    root.mkdir()
    config = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": HIDDEN,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_experts": experts, "num_experts_per_tok": 4, "moe_intermediate_size": EXPERT,
        "shared_expert_intermediate_size": SHARED, "intermediate_size": SHARED, "vocab_size": VOCAB,
        "decoder_sparse_step": 1, "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for layer in range(layers):
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        names = layer_tensors(layer, experts)
        if layer == 0:
            names += [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN))]
            names += [("model.norm.weight", (HIDDEN,))]
        tensors = {}
        for name, shape in names:
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            tensors[name] = (
                tensor.uniform_(0.8, 1.2) if len(shape) == 1 else tensor.normal_(0, 0.02, generator=generator)
            )
        save_file(tensors, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def write_adapter(root: Path, layers: int, experts: int) -> None:
    """PEFT's keys for LoRA on q/k/v/o_proj and the two fused expert parameters (gate_up_proj innermost)."""
    root.mkdir()
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(layers):
        key = f"base_model.model.model.layers.{layer}"
        for p in ATTENTION:
            tensors[f"{key}.self_attn.{p}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator) * 0.01
            tensors[f"{key}.self_attn.{p}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator) * 0.005
        for level, (out, inp) in (("experts.base_layer", (2 * EXPERT, HIDDEN)), ("experts", (HIDDEN, EXPERT))):
            tensors[f"{key}.mlp.{level}.lora_A.weight"] = torch.randn(RANK * experts, inp, generator=generator) * 0.01
            tensors[f"{key}.mlp.{level}.lora_B.weight"] = torch.randn(out, RANK * experts, generator=generator) * 0.005
    save_file(tensors, root / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(ATTENTION), "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "bias": "none", "use_rslora": False, "use_dora": False, "inference_mode": True,
    }  # fmt: skip
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read(root: Path, name: str) -> torch.Tensor:
    shard = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(root / shard, framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def verify(base: Path, adapter: Path, merged: Path, layers: int, experts: int) -> None:
    """Expert tensors of every layer against fp32 W + scale · B_e A_e rounded once, sliced here from PEFT's
    layout (A rows e·r…(e+1)·r, B columns e, e+E, …); the router and a norm bit-equal to the base."""
    failures = []
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        for layer in range(layers):
            key = f"base_model.model.model.layers.{layer}.mlp"
            picks = [("experts.base_layer", "gate_proj", 0, 0), ("experts.base_layer", "up_proj", experts - 1, 1)]
            picks.append(("experts", "down_proj", experts // 2, 0))
            for level, part, e, half in picks:
                a, b = f.get_tensor(f"{key}.{level}.lora_A.weight"), f.get_tensor(f"{key}.{level}.lora_B.weight")
                a_e, b_e = a[e * RANK : (e + 1) * RANK], b[:, e::experts]
                rows = b_e.shape[0] // 2 if part != "down_proj" else b_e.shape[0]
                b_e = b_e[half * rows : (half + 1) * rows]
                name = f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"
                w, ours = read(base, name), read(merged, name)
                reference = (w.float() + (b_e @ a_e) * (ALPHA / RANK)).to(torch.bfloat16)
                off = int(ulps(ours, reference).max())
                print(
                    f"  verify {name}: max {off} ulp from the reference, "
                    f"{float((ours != w).float().mean()):.0%} changed"
                )
                if off > 1 or torch.equal(ours, w):
                    failures.append(name)
            for name in (f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.input_layernorm.weight"):
                if not torch.equal(read(base, name), read(merged, name)):
                    failures.append(name)
    if failures:
        sys.exit(f"VERIFICATION FAILED for {', '.join(failures)}: the benchmark measured a wrong merge")
    print("  verify: OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    def check(base: Path, adapter: Path, merged: Path, tmp: Path) -> None:
        verify(base, adapter, merged, args.layers, args.experts)

    stack_bench(args, write_base, write_adapter, check, target=1.3)


if __name__ == "__main__":
    main()
