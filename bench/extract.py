"""Extraction benchmark of issue 3: full SVD then truncate (kohya / mergekit) vs `lorasurgeon extract --rank 16`.

    python bench/extract.py [--rank 16] [--layers 14] [--skip-model] [--tmp /tmp]

Part 1, single matrices: for 4096x4096 and 4096x11008 fp32 deltas with a slowly decaying spectrum (σ_i ∝ i^-0.5
over the first 1024 directions plus a flat noise floor: the shape fine-tuning deltas have), BASE and TUNED are
written as one-tensor safetensors files; each contender then runs in a fresh child process whose wall time and
peak RSS (`wait4` rusage) are recorded:
  - full-svd: read both, ΔW in fp32, torch.linalg.svd(full_matrices=False), keep the top r (what kohya's
    extract_lora_from_models.py and mergekit-extract-lora do), save the factors;
  - lorasurgeon: the real CLI, `lorasurgeon extract BASE TUNED -o OUT --rank r` (method auto).
Both outputs' factors are checked against ΔW: relative Frobenius error, and its ratio to the Eckart–Young
optimum (from the full SVD's singular values).

Part 2, whole model: a Llama-shaped bf16 pair (TinyLlama geometry, hidden 2048, intermediate 5632, --layers
layers: ~1.5 GB each) in Hugging Face layout, TUNED = BASE + a decaying-spectrum delta on every projection;
`lorasurgeon extract --rank r` total wall time and peak RSS.

Everything is built in a temporary directory that is removed afterwards. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHAPES = ((4096, 4096), (4096, 11008))
NAME = "model.layers.0.mlp.up_proj.weight"
HIDDEN, INTERMEDIATE, KV, VOCAB = 2048, 5632, 256, 32000
MB = 2**10  # ru_maxrss is in KiB on Linux

FULL_SVD = """
import sys, torch
from safetensors.torch import load_file, save_file
base, tuned, out, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
delta = {k: v.float() for k, v in load_file(tuned).items()}
for k, v in load_file(base).items():
    delta[k] -= v.float()
factors = {}
for k, d in delta.items():
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    factors[k + ".B"] = (u[:, :rank] * s[:rank]).contiguous()
    factors[k + ".A"] = vh[:rank].contiguous()
    factors[k + ".S"] = s
save_file(factors, out)
"""


def spectrum_delta(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(m, n) fp32 with σ_i ≈ i^-0.5 on 1024 random directions plus a flat floor from dense noise."""
    k = 1024
    u = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    noise = torch.randn(m, n, generator=generator) * (0.02 / (m * n) ** 0.25)
    return (u * sigma) @ v.T + noise


# Runs each measured command and reports (seconds, ru_maxrss KiB, exit code, stdout, stderr). It is started
# before the benchmark allocates anything: a child spawned straight from this (multi-GB) process would report
# this process's peak as its own, because Linux carries the parent's high-water mark into ru_maxrss when a
# vfork'd child execs.
SPAWNER = """
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(json.loads(line), stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        doc = [seconds, usage.ru_maxrss, os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()]
    print(json.dumps(doc), flush=True)
"""
_spawner: subprocess.Popen[str] | None = None


def measure(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one child process, run by the spawner."""
    global _spawner
    if _spawner is None:
        _spawner = subprocess.Popen(
            [sys.executable, "-c", SPAWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    assert _spawner.stdin is not None
    assert _spawner.stdout is not None
    _spawner.stdin.write(json.dumps(command) + "\n")
    _spawner.stdin.flush()
    seconds, maxrss, code, out, err = json.loads(_spawner.stdout.readline())
    if code != 0:
        raise SystemExit(f"{command[:3]} failed:\n{err}")
    return seconds, maxrss / MB, out


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(torch.addmm(delta, b, a, alpha=-1.0)) / torch.linalg.matrix_norm(delta))


def single_matrix(root: Path, shape: tuple[int, int], rank: int, generator: torch.Generator) -> dict[str, object]:
    base_w = torch.randn(shape, generator=generator) * 0.02
    delta = spectrum_delta(*shape, generator)
    base, tuned = root / "base.safetensors", root / "tuned.safetensors"
    save_file({NAME: base_w}, base, metadata={"format": "pt"})
    save_file({NAME: base_w + delta}, tuned, metadata={"format": "pt"})
    delta = (base_w + delta) - base_w  # exactly what both contenders see after fp32 rounding
    del base_w
    full_out, ours_out = root / "full.safetensors", root / "lora"
    full_s, full_rss, _ = measure([sys.executable, "-c", FULL_SVD, str(base), str(tuned), str(full_out), str(rank)])
    ours_s, ours_rss, _ = measure(
        ["lorasurgeon", "extract", str(base), str(tuned), "-o", str(ours_out), "--rank", str(rank), "--device", "cpu"]
    )
    with safe_open(full_out, "pt") as f:
        sigma = f.get_tensor(NAME + ".S").double()
        full_err = relative_error(delta, f.get_tensor(NAME + ".B"), f.get_tensor(NAME + ".A"))
    optimum = float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())
    prefix = "base_model.model." + NAME.removesuffix(".weight")
    with safe_open(ours_out / "adapter_model.safetensors", "pt") as f:
        ours_err = relative_error(
            delta, f.get_tensor(prefix + ".lora_B.weight"), f.get_tensor(prefix + ".lora_A.weight")
        )
    for path in (base, tuned, full_out, ours_out / "adapter_model.safetensors", ours_out / "adapter_config.json"):
        path.unlink()
    ours_out.rmdir()
    return {
        "shape": f"{shape[0]}x{shape[1]}",
        "full_s": full_s,
        "ours_s": ours_s,
        "speedup": full_s / ours_s,
        "optimum": optimum,
        "full_ratio": full_err / optimum,
        "ours_ratio": ours_err / optimum,
        "full_rss": full_rss,
        "ours_rss": ours_rss,
    }


def build_model(root: Path, layers: int, generator: torch.Generator) -> tuple[Path, Path, int]:
    """A Llama-shaped bf16 base/tuned pair in HF layout; returns the two directories and the bytes of one."""
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
              "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
              "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE)}  # fmt: skip
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 4, "vocab_size": VOCAB, "tie_word_embeddings": False}  # fmt: skip
    base_t, tuned_t = {}, {}
    for name, shape in [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN))]:
        base_t[name] = tuned_t[name] = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
    for i in range(layers):
        for module, (m, n) in shapes.items():
            name = f"model.layers.{i}.{module}.weight"
            w = torch.randn(m, n, generator=generator) * 0.02
            k = 64  # a decaying delta: σ ∝ i^-0.5 on 64 directions plus a dense floor
            delta = (torch.randn(m, k, generator=generator) * torch.arange(1, k + 1) ** -0.5) @ torch.randn(
                k, n, generator=generator
            ) * 2e-4 + torch.randn(m, n, generator=generator) * 2e-4
            base_t[name], tuned_t[name] = w.bfloat16(), (w + delta).bfloat16()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            base_t[f"model.layers.{i}.{norm}.weight"] = tuned_t[f"model.layers.{i}.{norm}.weight"] = torch.ones(HIDDEN)
    base_t["model.norm.weight"] = tuned_t["model.norm.weight"] = torch.ones(HIDDEN)
    dirs = []
    for label, tensors in (("base", base_t), ("tuned", tuned_t)):
        (root / label).mkdir()
        save_file(tensors, root / label / "model.safetensors", metadata={"format": "pt"})
        (root / label / "config.json").write_text(json.dumps(config))
        dirs.append(root / label)
    return dirs[0], dirs[1], (root / "base" / "model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--tmp", type=Path, default=None)
    args = parser.parse_args()
    measure(["true"])  # start the spawner while this process is still small
    generator = torch.Generator().manual_seed(0)
    print(f"# lorasurgeon extract benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank})\n")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        print("| matrix | full SVD s | lorasurgeon s | speedup | optimum rel. err | full SVD / opt | "
              "lorasurgeon / opt | full SVD peak RSS MiB | lorasurgeon peak RSS MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for shape in SHAPES:
            r = single_matrix(root, shape, args.rank, generator)
            print(f"| {r['shape']} | {r['full_s']:.1f} | {r['ours_s']:.1f} | {r['speedup']:.1f}x | "
                  f"{r['optimum']:.4f} | {r['full_ratio']:.5f} | {r['ours_ratio']:.5f} | {r['full_rss']:.0f} | "
                  f"{r['ours_rss']:.0f} |", flush=True)  # fmt: skip
        if args.skip_model:
            return
        base, tuned, size = build_model(root, args.layers, generator)
        out = root / "lora"
        cmd = ["lorasurgeon", "extract", str(base), str(tuned), "-o", str(out), "--rank", str(args.rank), "--json"]
        seconds, rss, stdout = measure(cmd)
        doc = json.loads(stdout)
        methods = sorted({m["method"] for m in doc["matrices"]})
        print(f"\nwhole model: {size / 1e9:.2f} GB bf16 per checkpoint, {len(doc['matrices'])} matrices "
              f"(methods: {', '.join(methods)}), total relative error {doc['total']['relative_error']:.4f}: "
              f"{seconds:.1f} s wall, peak RSS {rss:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
