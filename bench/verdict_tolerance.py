"""Measure the ulp errors `verify` must accept and must refuse (issue 16), to set its default tolerance.

    python bench/verdict_tolerance.py [--hidden 32 64] [--seeds 0 1 2]

For each tiny transformers Llama (2 layers, seeded, built here) and a PEFT LoRA on the seven projections plus
embed_tokens and lm_head (init_lora_weights=False, B ≠ 0), every adapted tensor is judged by
lorasurgeon.verdict against E = round(fp32(BASE) + ΔW), ΔW = s·B@A computed here in fp32 from the adapter file:
  - peft-bf16 / peft-fp32: PEFT's own merge_and_unload() on the base loaded in that dtype, then save_pretrained;
  - scale-0.99 / scale-0.5: round(fp32(BASE) + c·ΔW), a merge at the wrong scale;
  - all of it again with "small" ΔW: B drawn 250x smaller, ‖ΔW‖ about 1 % of ‖W‖ (a trained adapter's size).
Prints, per case: the largest error in ulps at the operands' magnitude (verdict.ulps, what the tolerance is
compared with) and in ulps of E itself (integer bit-pattern distance), the share of elements ≠ E, the verdicts
(counted), and for the fit of MERGED − BASE to E − BASE the largest |c − 1| / σ (z, verdict's drift).
Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorasurgeon import verdict

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [*PROJECTIONS, "embed_tokens", "lm_head"]


def build(root: Path, hidden: int, seed: int, small: bool) -> tuple[Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = root / "base"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.0002 if small else 0.05)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter


def deltas(adapter: Path, scale: float) -> dict[str, torch.Tensor]:
    """Base tensor name -> fp32 ΔW, from the adapter file."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        module = key.removeprefix("base_model.model.")
        if module.endswith(".lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module.removesuffix(".lora_A.weight") + ".weight"] = (b.float() @ a.float()) * scale
        elif module.endswith(".lora_embedding_A"):
            b = tensors[key.replace("lora_embedding_A", "lora_embedding_B")]
            out[module.removesuffix(".lora_embedding_A") + ".weight"] = (b.float() @ a.float()).T * scale
    return out


def peft_merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return load_file(out / "model.safetensors")


def judge(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict:
    rows = collections.Counter()
    worst, result_ulps, off, total, z, size = 0.0, 0, 0, 0, 0.0, 0.0
    for name, d in delta.items():
        b, m = base[name], merged[name]
        v = verdict.judge_tensor(b, m, d)
        rows[v.kind] += 1
        worst = max(worst, v.max_ulps)
        expected = (b.float() + d).to(b.dtype)
        distance = verdict.ulp_distance(m, expected)
        result_ulps = max(result_ulps, int(distance.max()))
        off += int((distance > 0).sum())
        total += b.numel()
        z = max(z, v.drift or 0.0)
        size = max(size, float(d.norm() / b.float().norm()))
    return {
        "max_ulps": worst,
        "result_ulps": result_ulps,
        "off": off / total,
        "verdicts": dict(rows),
        "z": z,
        "size": size,
    }


def run_case(hidden: int, seed: int, small: bool) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_dir, adapter = build(root, hidden, seed, small)
        base = load_file(base_dir / "model.safetensors")
        delta = deltas(adapter, 16 / 8)
        cases = {
            "peft-bf16": peft_merge(base_dir, adapter, root / "m16", torch.bfloat16),
            "scale-0.99": {k: (base[k].float() + 0.99 * d).to(base[k].dtype) for k, d in delta.items()},
            "scale-0.5": {k: (base[k].float() + 0.5 * d).to(base[k].dtype) for k, d in delta.items()},
        }
        results = {name: judge(base, merged, delta) for name, merged in cases.items()}
        base32 = {k: v.float() for k, v in base.items()}
        merged32 = peft_merge(base_dir, adapter, root / "m32", torch.float32)
        results["peft-fp32"] = judge(base32, merged32, delta)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| ΔW size | max ‖ΔW‖/‖W‖ | hidden | seed | case | max ulps | max ulps of E | elements ≠ E | verdicts | max z |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for small in (False, True):
        for hidden in args.hidden:
            for seed in args.seeds:
                for case, r in run_case(hidden, seed, small).items():
                    size = "small" if small else "large"
                    cells = [size, f"{r['size']:.3f}", hidden, seed, case, f"{r['max_ulps']:.2f}", r["result_ulps"]]
                    cells += [f"{100 * r['off']:.2f} %", r["verdicts"], f"{r['z']:.1f}"]
                    print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
