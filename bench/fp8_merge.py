"""FP8 merge benchmark of issue 13: `lorasurgeon merge` into a DeepSeek-V3-shaped FP8 block-quantized layer stack
(F8_E4M3 weights, F32 128×128 `weight_scale_inv`, experts per expert as DeepSeek ships them), against a plain
copy of the same files; run at two sizes to show peak RSS flat in model size.

    python bench/fp8_merge.py [--layers 1] [--experts 8] [--repeat 1] [--device cpu|cuda] [--tmp /tmp]

Geometry of DeepSeek-V3 (hidden 7168; MLA: q_lora_rank 1536, kv_lora_rank 512, 128 heads of 128 + 64 rope;
experts of intermediate 2048, one shared expert), with --experts routed experts per layer instead of 256: about
187 MB of attention and 44 MB per expert per layer. Weights are random valid e4m3 bytes with random block
scales (quantizing real values would take longer than the merge). The adapter: r=16 on q_a/q_b/kv_a/kv_b/o_proj
and on the fused experts (target_parameters gate_up_proj and down_proj), fp32, with ΔW a sizeable fraction of
W so that it survives re-quantization. The merge's own figures (survival, error per weight) are printed from
its --json document; the first run's output is checked against an fp64 dequantize-add reference within the
error it reports, and untouched tensors bit for bit. With the `fp8` extra the merge runs lorasurgeon.fp8_kernel's
compiled loops; they are compiled into numba's cache before the first measurement.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import command, stack_bench

HIDDEN, EXPERT, HEADS, Q_RANK, KV_RANK, NOPE, ROPE, V_HEAD = 7168, 2048, 128, 1536, 512, 128, 64, 128
BLOCK, RANK, ALPHA = 128, 16, 32
ATTENTION = {
    "q_a_proj": (Q_RANK, HIDDEN),
    "q_b_proj": (HEADS * (NOPE + ROPE), Q_RANK),
    "kv_a_proj_with_mqa": (KV_RANK + ROPE, HIDDEN),
    "kv_b_proj": (HEADS * (NOPE + V_HEAD), KV_RANK),
    "o_proj": (HIDDEN, HEADS * V_HEAD),
}


def fp8_weight(shape: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes (no NaN codes 0x7F/0xFF) and positive block scales of a DeepSeek weight's grid."""
    codes = torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=generator)
    codes |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=generator) << 7
    grid = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    scale = torch.rand(grid, generator=generator) * 2e-4 + 1e-5
    return codes.view(torch.float8_e4m3fn), scale


def layer_tensors(layer: int, experts: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    prefix = f"model.layers.{layer}"
    out: list[tuple[str, tuple[int, int] | tuple[int]]] = [
        (f"{prefix}.self_attn.{p}.weight", s) for p, s in ATTENTION.items()
    ]
    for e in [*range(experts), "shared"]:
        mlp = f"{prefix}.mlp.experts.{e}" if e != "shared" else f"{prefix}.mlp.shared_experts"
        out += [(f"{mlp}.gate_proj.weight", (EXPERT, HIDDEN)), (f"{mlp}.up_proj.weight", (EXPERT, HIDDEN))]
        out += [(f"{mlp}.down_proj.weight", (HIDDEN, EXPERT))]
    out += [(f"{prefix}.mlp.gate.weight", (experts, HIDDEN)), (f"{prefix}.input_layernorm.weight", (HIDDEN,))]
    out += [
        (f"{prefix}.self_attn.q_a_layernorm.weight", (Q_RANK,)),
        (f"{prefix}.self_attn.kv_a_layernorm.weight", (KV_RANK,)),
    ]
    return out


def write_base(root: Path, layers: int, experts: int) -> None:
    root.mkdir()
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
        "num_hidden_layers": layers, "n_routed_experts": experts, "moe_intermediate_size": EXPERT,
        "n_shared_experts": 1, "first_k_dense_replace": 0, "q_lora_rank": Q_RANK, "kv_lora_rank": KV_RANK,
        "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V_HEAD, "num_attention_heads": HEADS,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]},
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for layer in range(layers):
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in layer_tensors(layer, experts):
            if len(shape) == 2 and not name.endswith("mlp.gate.weight"):
                tensors[name], tensors[f"{name}_scale_inv"] = fp8_weight(shape, generator)  # type: ignore[arg-type]
            else:
                tensors[name] = torch.randn(shape, generator=generator).to(torch.bfloat16)
        save_file(tensors, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def write_adapter(root: Path, layers: int, experts: int) -> None:
    root.mkdir()
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(layers):
        key = f"base_model.model.model.layers.{layer}"
        for p, (out, inp) in ATTENTION.items():
            tensors[f"{key}.self_attn.{p}.lora_A.weight"] = torch.randn(RANK, inp, generator=generator) * 0.05
            tensors[f"{key}.self_attn.{p}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.05
        for level, (out, inp) in (("experts.base_layer", (2 * EXPERT, HIDDEN)), ("experts", (HIDDEN, EXPERT))):
            tensors[f"{key}.mlp.{level}.lora_A.weight"] = torch.randn(RANK * experts, inp, generator=generator) * 0.05
            tensors[f"{key}.mlp.{level}.lora_B.weight"] = torch.randn(out, RANK * experts, generator=generator) * 0.05
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


def dequantized(root: Path, name: str) -> torch.Tensor:
    q, s = read(root, name).double(), read(root, f"{name}_scale_inv").double()
    return q * s.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]


def verify(base: Path, adapter: Path, merged: Path, figures: dict[str, dict[str, float]], experts: int) -> None:
    """An expert half and an attention weight: ‖deq(OUT) − (deq(BASE) + ΔW)‖ / ‖ΔW‖ (fp64, ΔW sliced here from
    PEFT's layout) equals the error the merge reports; untouched tensors keep their bytes."""
    failures = []
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        key = "base_model.model.model.layers.0"
        a, b = (f.get_tensor(f"{key}.mlp.experts.base_layer.lora_{r}.weight").double() for r in "AB")
        e = experts - 1
        b_e = b[:, e::experts][EXPERT:]  # the up half of expert e
        checks = {f"model.layers.0.mlp.experts.{e}.up_proj.weight": b_e @ a[e * RANK : (e + 1) * RANK]}
        qa, qb = (f.get_tensor(f"{key}.self_attn.q_b_proj.lora_{r}.weight").double() for r in "AB")
        checks["model.layers.0.self_attn.q_b_proj.weight"] = qb @ qa
    for name, product in checks.items():
        delta = product * (ALPHA / RANK)
        error = float((dequantized(merged, name) - dequantized(base, name) - delta).norm() / delta.norm())
        reported = figures[name]["error"]
        print(f"  verify {name}: error {error:.4f} (reported {reported:.4f}), survival {figures[name]['survival']:.3f}")
        if abs(error - reported) > 1e-3 * max(reported, 1e-3):
            failures.append(name)
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_experts.up_proj.weight"):
        if not torch.equal(read(base, name).view(torch.uint8), read(merged, name).view(torch.uint8)):
            failures.append(name)
    if failures:
        sys.exit(f"VERIFICATION FAILED for {', '.join(failures)}: the benchmark measured a wrong merge")
    print("  verify: OK")


def merge_command(base: Path, adapter: Path, out: Path, device: str, document: Path) -> list[str]:
    """The measured merge, its --json document written to `document` (sh execs the merge itself)."""
    argv = " ".join(shlex.quote(a) for a in [*command("merge", base, adapter, out, device), "--json"])
    return ["sh", "-c", f"exec {argv} > {shlex.quote(str(document))}"]


def figures_of(document: Path) -> dict[str, dict[str, float]]:
    """The merge's survival figures per weight, from its --json document."""
    return {f["tensor"]: f for f in json.loads(document.read_text())["requantized"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    def merge_argv(base: Path, adapter: Path, out: Path, tmp: Path) -> list[str]:
        return merge_command(base, adapter, out, args.device, tmp / "merge.json")

    def check(base: Path, adapter: Path, merged: Path, tmp: Path) -> None:
        figures = figures_of(tmp / "merge.json")
        lost = sum(f["lost"] for f in figures.values())
        survival = statistics.median(f["survival"] for f in figures.values())
        print(f"  {len(figures)} weights merged in format, median survival {survival:.3f}, {lost} flagged lost")
        verify(base, adapter, merged, figures, args.experts)

    warm_compiled_loops()
    stack_bench(args, write_base, write_adapter, check, target=1.5, merge_argv=merge_argv)


def warm_compiled_loops() -> None:
    """Compile the CPU merge's loops into numba's cache now, if they are not there yet (the `fp8` extra): the
    first merge after installing pays about 10 s for it, which a user pays once, not per merge."""
    from lorasurgeon import fp8, fp8_merge

    q, s = fp8.quantize_blocks(torch.randn(256, 256), (BLOCK, BLOCK))
    fp8_merge.merge_fp8_block(q, s, torch.randn(256, 256) * 0.01, (BLOCK, BLOCK))


if __name__ == "__main__":
    main()
