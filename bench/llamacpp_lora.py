"""Run llama.cpp's own convert_lora_to_gguf.py on an extract-like adapter, before and after lorasurgeon's fold.

    python bench/llamacpp_lora.py LLAMA_CPP_DIR [--work DIR]

LLAMA_CPP_DIR is a llama.cpp checkout (its convert_lora_to_gguf.py, conversion/ or convert_hf_to_gguf.py, and
gguf-py/ are used; nothing is built). No llama.cpp code is part of lorasurgeon: it runs in a subprocess.

1. A tiny fp32 Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) and a PEFT LoRA on its 14 projection matrices
   shaped like `lorasurgeon extract --energy` output: a different rank per module (rank_pattern) and a
   matching alpha_pattern, so that PEFT's scale is 1 everywhere; B ≠ 0.
2. convert_lora_to_gguf.py --base BASE --outtype f32 ADAPTER -> a .gguf; read with the gguf package's reader.
   llama.cpp's ΔW per tensor is (alpha / rank)·B@A with alpha the file's adapter.lora.alpha and rank B's
   column count (src/llama-adapter.h get_scale: `adapter_scale * alpha / rank`, rank = b->ne[0]), compared
   with PEFT's ΔW = sᵢ·B@A (q/k rows permuted as the converter permutes them for RoPE).
3. The same after lorasurgeon's lowering for llama.cpp (runtimes.plan_lowering + lowering.fold_scale): one
   lora_alpha, no alpha_pattern, B′ = B·sᵢ·rᵢ/α.
Prints, per tensor, the relative Frobenius error ‖ΔW_llama.cpp − ΔW_PEFT‖ / ‖ΔW_PEFT‖ before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorasurgeon import lowering, runtimes
from lorasurgeon.adapter_facts import AdapterFacts, ModuleFacts

HEADS, KV_HEADS, LAYERS = 4, 2, 2
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
RANKS = [2, 3, 4, 5, 6, 7, 8]  # per projection; layer 1 gets them reversed


def build(root: Path) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = root / "base"
    LlamaForCausalLM(config).save_pretrained(base)
    ranks = {}
    for layer in range(LAYERS):
        order = RANKS if layer == 0 else RANKS[::-1]
        for rank, projection in zip(order, GGUF_NAMES, strict=True):
            ranks[f"model.layers.{layer}.{projection}"] = rank
    lora = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=[p.split(".")[1] for p in GGUF_NAMES],
        rank_pattern=ranks,
        alpha_pattern={k: float(v) for k, v in ranks.items()},  # alpha = rank: scale 1, as extract writes
        init_lora_weights=False,
    )
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return base, adapter


def facts_of(adapter: Path) -> tuple[AdapterFacts, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """AdapterFacts of a plain PEFT LoRA directory (what the lead's loader will build from the normal form)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    factors, modules = {}, []
    for key, a in sorted(tensors.items()):
        if key.endswith(".lora_A.weight"):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            alpha = float(config.get("alpha_pattern", {}).get(path, config["lora_alpha"]))
            rank = a.shape[0]
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            modules.append(ModuleFacts(path, "linear", rank, alpha, scale))
            factors[path] = (a, b)
    facts = AdapterFacts(
        tuple(modules),
        r=config["r"],
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        rank_pattern=bool(config.get("rank_pattern")),
        alpha_pattern=bool(config.get("alpha_pattern")),
    )
    return facts, factors


def fold(adapter: Path, out: Path) -> None:
    """lorasurgeon's lowering for llama.cpp, written as a PEFT directory."""
    facts, factors = facts_of(adapter)
    plan = runtimes.plan_lowering("llamacpp", facts)
    tensors = {}
    for m in plan.modules:
        a, b = factors[m.path]
        tensors[f"base_model.model.{m.path}.lora_A.weight"] = a
        tensors[f"base_model.model.{m.path}.lora_B.weight"] = lowering.fold_scale(b, m.factor, 1.0)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(lora_alpha=plan.lora_alpha, alpha_pattern={}, use_rslora=False)
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


def convert(llama_cpp: Path, base: Path, adapter: Path, out: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter needs its own gguf-py (PyPI gguf 0.19.0 lacks LazyChunkedTensor)
    command = [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base)]
    command += ["--outtype", "f32", "--outfile", str(out), str(adapter)]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)


def llama_deltas(gguf_file: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """adapter.lora.alpha and, per GGUF weight name, the ΔW llama.cpp applies: (alpha / rank)·B@A."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    data = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    deltas = {}
    for name, a in data.items():
        if name.endswith(".lora_a"):
            b = data[name.removesuffix(".lora_a") + ".lora_b"]  # (out, r): rank = b->ne[0] = B's columns
            scale = alpha / b.shape[1] if alpha else 1.0
            deltas[name.removesuffix(".lora_a")] = scale * (b @ a)
    return alpha, deltas


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's RoPE row permutation of q / k weights (conversion/llama.py LlamaModel.permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_name(path: str) -> str:
    layer, projection = path.split(".", 3)[2:]
    return f"blk.{layer}.{GGUF_NAMES[projection]}.weight"


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's ΔW per GGUF weight name (q / k rows permuted as the converter does)."""
    facts, factors = facts_of(adapter)
    out = {}
    for m in facts.modules:
        a, b = factors[m.path]
        delta = m.scale * (b.float() @ a.float())
        if m.name == "q_proj":
            delta = permute(delta, HEADS)
        elif m.name == "k_proj":
            delta = permute(delta, KV_HEADS)
        out[gguf_name(m.path)] = delta
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llama_cpp", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="an empty directory for the files (default: temporary)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        base, adapter = build(root)
        fold(adapter, root / "folded")
        expected = peft_deltas(adapter)
        assert expected.keys() == peft_deltas(root / "folded").keys()
        results = {}
        for label, source in (("before", adapter), ("after", root / "folded")):
            convert(args.llama_cpp, base, source, root / f"{label}.gguf")
            results[label] = llama_deltas(root / f"{label}.gguf")
        print(f"adapter.lora.alpha: before {results['before'][0]:g}, after {results['after'][0]:g}")
        print("| tensor | rank | rel. error before | rel. error after |")
        print("|---|---|---|---|")
        ranks = {gguf_name(m.path): m.rank for m in facts_of(adapter)[0].modules}
        for name, delta in expected.items():
            errors = [float((results[k][1][name] - delta).norm() / delta.norm()) for k in ("before", "after")]
            print(f"| {name} | {ranks[name]} | {errors[0]:.3g} | {errors[1]:.3g} |")


if __name__ == "__main__":
    main()
