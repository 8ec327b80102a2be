"""Report benchmark of issue 4: header-only `lorasurgeon report` of a 100-shard checkpoint vs the header floor.

    python bench/report.py [--shards 100] [--repeat 30] [--tmp /tmp]

Builds, in a temporary directory removed afterwards, a Llama-70B-shaped bf16 checkpoint (hidden 8192,
intermediate 28672, 8 KV heads of 128) in Hugging Face layout: one transformer block per shard (nine tensors,
1.71 GB each), the embeddings in the first shard and lm_head in the last, and a model.safetensors.index.json.
Every shard is a real safetensors header followed by a sparse hole as long as its tensors, so ~170 GB of
checkpoint takes a few MB of disk.

Two contenders, each timed in this process after one warm-up run (page cache warm for both):
- floor: the same headers read with plain `safetensors.safe_open` in a loop (keys, shape and dtype of every
  tensor, the metadata), plus the index read with `json.load`;
- report: `lorasurgeon.report(dir)` (header-only), and `report_doc` on its result (what `--json` prints);
- for reference, `Checkpoint.open(dir)` alone: the core's header reader and validator, which the report uses.
Prints the median and best wall time of each over --repeat runs, the ratio report / floor (target <= 1.5x),
and, for reference, one end-to-end `lorasurgeon report DIR --json` in a child process (Python and torch
start-up included).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

import lorasurgeon
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.documents import report_doc
from lorasurgeon.header import build_header, nbytes_of

HIDDEN, INTERMEDIATE, KV, VOCAB = 8192, 28672, 1024, 128256
BLOCK = {
    "input_layernorm.weight": (HIDDEN,),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "post_attention_layernorm.weight": (HIDDEN,),
    "self_attn.k_proj.weight": (KV, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (KV, HIDDEN),
}


def build(root: Path, shards: int) -> int:
    """Write the sparse checkpoint; returns its logical size in bytes."""
    weight_map, total = {}, 0
    for i in range(shards):
        entries = [(f"model.layers.{i}.{name}", "BF16", shape) for name, shape in BLOCK.items()]
        if i == 0:
            entries.insert(0, ("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN)))
        if i == shards - 1:
            entries += [("lm_head.weight", "BF16", (VOCAB, HIDDEN)), ("model.norm.weight", "BF16", (HIDDEN,))]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header = build_header(entries, {"format": "pt"})
        size = sum(nbytes_of(dtype, shape) for _, dtype, shape in entries)
        with open(root / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + size)  # the tensor data: a hole
        weight_map |= {tensor: name for tensor, _, _ in entries}
        total += size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": shards}))
    return total


def floor(root: Path) -> int:
    """Every header through safetensors.safe_open: names, shapes, dtypes, metadata. Returns the parameter count."""
    index = json.loads((root / "model.safetensors.index.json").read_text())
    parameters = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(root / shard, "pt") as f:
            f.metadata()
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = f.get_slice(key)
                view.get_dtype()
                parameters += math.prod(view.get_shape())
    return parameters


def ours(root: Path) -> int:
    report = lorasurgeon.report(root)
    report_doc(report)
    return report.totals.parameters


def headers(root: Path) -> int:
    """lorasurgeon's own header reader alone (Checkpoint.open), the part of `ours` that is not the report."""
    with Checkpoint.open(root) as ckpt:
        return sum(t.numel for t in ckpt.tensors.values())


def timed(contenders: dict[str, Callable[[Path], int]], root: Path, repeat: int) -> dict[str, list[float]]:
    """Wall times of each contender, interleaved in a rotating order so machine load hits all alike."""
    for fn in contenders.values():
        fn(root)  # warm-up: page cache, imports, allocator
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(repeat):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            contenders[name](root)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tmp", default=None, help="where to build the sparse checkpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        size = build(root, args.shards)
        disk = sum(p.stat().st_blocks * 512 for p in root.iterdir())
        print(f"checkpoint: {args.shards} shards, {size / 1e9:.1f} GB logical, {disk / 1e6:.1f} MB on disk")
        if floor(root) != ours(root):
            sys.exit(f"parameter counts differ: safe_open {floor(root):,}, report {ours(root):,}")
        print(f"parameters: {ours(root):,} (safe_open and report agree)")
        contenders = {
            "safe_open loop (floor)": floor,
            "lorasurgeon.report + report_doc": ours,
            "of which Checkpoint.open (core header reader)": headers,
        }
        times = timed(contenders, root, args.repeat)
        floor_times, our_times = times["safe_open loop (floor)"], times["lorasurgeon.report + report_doc"]
        print("\n| contender | median (ms) | best (ms) | median / floor |\n|---|---|---|---|")
        for name, runs in times.items():
            ratio = statistics.median(runs) / statistics.median(floor_times)
            print(f"| {name} | {statistics.median(runs) * 1e3:.1f} | {min(runs) * 1e3:.1f} | {ratio:.2f}x |")
        ratio = statistics.median(our_times) / statistics.median(floor_times)
        print(f"\nratio report / floor (medians): {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})")
        start = time.perf_counter()
        cli = [sys.executable, "-m", "lorasurgeon", "report", str(root), "--json"]
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
        print(f"end to end `lorasurgeon report DIR --json` (child process, imports included): "
              f"{time.perf_counter() - start:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
