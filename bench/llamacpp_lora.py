"""Run llama.cpp's own convert_lora_to_gguf.py on adapters lorasurgeon writes, and on PEFT's patterns form.

    python bench/llamacpp_lora.py LLAMA_CPP_DIR [--work DIR]

LLAMA_CPP_DIR is a llama.cpp checkout (its convert_lora_to_gguf.py, conversion/ or convert_hf_to_gguf.py, and
gguf-py/ are used; nothing is built). No llama.cpp code is part of lorasurgeon: it runs in a subprocess.

1. A tiny fp32 Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) and a "fine-tune" of it: each of the 14
   projection matrices plus an exact low-rank ΔW of rank 2 to 8, so that `extract --energy 0.999999` finds a different
   rank per module.
2. The adapters: `lorasurgeon extract --energy 0.999999 --patterns` (rank_pattern + alpha_pattern = rank, scale 1:
   what extract wrote before issue 16) and `lorasurgeon extract --energy 0.999999` (the default single-alpha form: one
   lora_alpha, each module's lora_alpha / rᵢ folded into its factors); and a PEFT adapter with the same kind of
   patterns, as PEFT saves it, before and after `lorasurgeon convert --to peft` (the default form: B′ = B·sᵢ·rᵢ/α).
3. convert_lora_to_gguf.py --base BASE --outtype f32 ADAPTER -> a .gguf, read with the gguf package's reader.
   llama.cpp's ΔW per tensor is (alpha / rank)·B@A with alpha the file's adapter.lora.alpha and rank B's
   column count (src/llama-adapter.h get_scale: `adapter_scale * alpha / rank`, rank = b->ne[0]), compared with
   the ΔW each adapter means: the fine-tune's (extracts; exact up to the SVD's rounding) or PEFT's sᵢ·B@A (q / k
   rows permuted as the converter permutes them for RoPE).
Prints, per adapter, the worst relative Frobenius error ‖ΔW_llama.cpp − ΔW‖ / ‖ΔW‖ and how many tensors are off
by more than 1e-4, and a per-tensor table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lorasurgeon

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


def module_ranks() -> dict[str, int]:
    ranks = {}
    for layer in range(LAYERS):
        for rank, projection in zip(RANKS if layer == 0 else RANKS[::-1], GGUF_NAMES, strict=True):
            ranks[f"model.layers.{layer}.{projection}"] = rank
    return ranks


def build(root: Path) -> tuple[Path, Path, Path]:
    """BASE, TUNED = BASE + exact low-rank ΔWs, and a PEFT adapter with rank_pattern + alpha_pattern."""
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
    base, tuned = root / "base", root / "tuned"
    LlamaForCausalLM(config).save_pretrained(base)
    tensors = load_file(base / "model.safetensors")
    for module, rank in module_ranks().items():
        weight = tensors[f"{module}.weight"]
        delta = torch.randn(weight.shape[0], rank) @ torch.randn(rank, weight.shape[1])  # (out, r) @ (r, in)
        tensors[f"{module}.weight"] = weight + 0.1 * delta
    tuned.mkdir()
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    (tuned / "config.json").write_bytes((base / "config.json").read_bytes())
    ranks = module_ranks()
    lora = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=[p.split(".")[1] for p in GGUF_NAMES],
        rank_pattern=ranks,
        alpha_pattern={k: float(v) for k, v in ranks.items()},  # alpha = rank: scale 1
        init_lora_weights=False,
    )
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(root / "peft")
    return base, tuned, root / "peft"


def gguf(llama_cpp: Path, base: Path, adapter: Path, out: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter needs its own gguf-py (PyPI gguf 0.19.0 lacks LazyChunkedTensor)
    command = [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base)]
    command += ["--outtype", "f32", "--outfile", str(out), str(adapter)]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return out


def llama_deltas(gguf_file: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """adapter.lora.alpha and, per GGUF weight name, the ΔW llama.cpp applies: (alpha / rank)·B@A."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    data = {t.name: torch.from_numpy(t.data.copy()).double() for t in reader.tensors}
    deltas = {}
    for name, a in data.items():
        if name.endswith(".lora_a"):
            b = data[name.removesuffix(".lora_a") + ".lora_b"]  # (out, r): rank = b->ne[0] = B's columns
            deltas[name.removesuffix(".lora_a")] = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
    return alpha, deltas


def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The converter's RoPE row permutation of q / k weights (conversion/llama.py LlamaModel.permute)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def gguf_name(path: str) -> str:
    layer, projection = path.split(".", 3)[2:]
    return f"blk.{layer}.{GGUF_NAMES[projection]}.weight"


def by_gguf_name(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> ΔW, renamed and permuted as the converter writes them."""
    out = {}
    for path, delta in deltas.items():
        heads = {"q_proj": HEADS, "k_proj": KV_HEADS}.get(path.rsplit(".", 1)[1])
        out[gguf_name(path)] = permute(delta, heads) if heads else delta
    return out


def tuned_deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    old, new = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    return by_gguf_name({m: new[f"{m}.weight"].double() - old[f"{m}.weight"].double() for m in module_ranks()})


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's ΔW of the patterned PEFT adapter: sᵢ·B@A with sᵢ = alpha_pattern / rank_pattern = 1."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    for module, rank in module_ranks().items():
        key = f"base_model.model.{module}"
        scale = config["alpha_pattern"][module] / rank
        out[module] = scale * (tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double())
    return by_gguf_name(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llama_cpp", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="an empty directory for the files (default: temporary)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.llama_cpp / "gguf-py"))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        base, tuned, peft = build(root)
        lorasurgeon.extract(base, tuned, root / "extract-patterns", energy=0.999999, patterns=True)
        lorasurgeon.extract(base, tuned, root / "extract", energy=0.999999)
        lorasurgeon.convert(peft, root / "peft-converted", to="peft")
        truth, meant = tuned_deltas(base, tuned), peft_deltas(peft)
        cases = {
            "extract --energy 0.999999 --patterns": (root / "extract-patterns", truth),
            "extract --energy 0.999999": (root / "extract", truth),
            "PEFT, rank_pattern + alpha_pattern": (peft, meant),
            "convert --to peft of it": (root / "peft-converted", meant),
        }
        table: dict[str, list[float]] = {}
        print("| adapter | adapter.lora.alpha | worst rel. error | tensors off by > 1e-4 |")
        print("|---|---|---|---|")
        for label, (adapter, expected) in cases.items():
            alpha, got = llama_deltas(gguf(args.llama_cpp, base, adapter, root / f"{adapter.name}.gguf"))
            errors = {n: float((got[n] - d).norm() / d.norm()) for n, d in expected.items()}
            table[label] = [errors[n] for n in expected]
            off = sum(e > 1e-4 for e in errors.values())
            print(f"| {label} | {alpha:g} | {max(errors.values()):.3g} | {off} of {len(errors)} |")
        print()
        print("| tensor | rank | " + " | ".join(table) + " |")
        print("|---|---|" + "---|" * len(table))
        ranks = {gguf_name(m): r for m, r in module_ranks().items()}
        for i, name in enumerate(truth):
            print(f"| {name} | {ranks[name]} | " + " | ".join(f"{v[i]:.3g}" for v in table.values()) + " |")


if __name__ == "__main__":
    main()
