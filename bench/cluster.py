"""Extract on a local 2-worker Ray cluster against the local run (issue 17), and where Ray's overhead stops paying.

    python bench/cluster.py [--sizes 64,256,512,1024,1536] [--count 12] [--method exact] [--repeat 2]

For each matrix size, builds (in a temporary directory, removed afterwards) a BASE and a TUNED safetensors file
of `count` fp32 square matrices whose ΔW has a slowly decaying spectrum, and extracts rank 16 three ways, in
this process (its imports paid once):

- local, torch's own threads (both cores for each matrix's SVD: what `extract` does by default);
- local, --threads 1 (the reference for bit-identity);
- --cluster ray with --threads 1 on a Ray instance of 2 CPUs started by this script (two matrices at a time,
  each on one core); its start-up is reported apart, and the first cluster run (workers starting) too.

The cluster's adapter must be byte-identical to the local --threads 1 adapter, or the script fails. Prints a
Markdown table: seconds per run (median), Ray's time over each local run's, and what Ray adds per matrix to the
local --threads 1 run (negative: the two workers gain more than the tasks cost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorasurgeon

RANK = 16


def write_pair(root: Path, size: int, count: int) -> tuple[Path, Path]:
    """BASE and TUNED files of `count` (size, size) matrices; ΔW = U diag(σ) Vᵀ with σ_i ∝ i^-0.5."""
    generator = torch.Generator().manual_seed(size)
    base, tuned = {}, {}
    sigma = torch.arange(1, size + 1, dtype=torch.float32) ** -0.5
    for i in range(count):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        w = torch.randn(size, size, generator=generator) * 0.02
        u = torch.linalg.qr(torch.randn(size, size, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(size, size, generator=generator)).Q
        base[name], tuned[name] = w, w + (u * sigma * 0.01) @ v.T
    root.mkdir(parents=True)
    save_file(base, root / "base.safetensors")
    save_file(tuned, root / "tuned.safetensors")
    return root / "base.safetensors", root / "tuned.safetensors"


def timed(base: Path, tuned: Path, out: Path, **options: object) -> tuple[float, bytes]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    lorasurgeon.extract(base, tuned, out, rank=RANK, **options)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    return seconds, (out / "adapter_model.safetensors").read_bytes()


def measure(size: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    base, tuned = write_pair(tmp / f"pair-{size}", size, args.count)
    runs: dict[str, list[float]] = {"local": [], "local-1": [], "ray": []}
    first = None
    for rep in range(args.repeat + 1):  # repeat 0 warms the page cache and Ray's workers
        seconds, _ = timed(base, tuned, tmp / "local", method=args.method)
        seconds_1, reference = timed(base, tuned, tmp / "local-1", method=args.method, threads=1)
        seconds_ray, clustered = timed(base, tuned, tmp / "ray", method=args.method, threads=1, cluster="ray")
        if clustered != reference:
            sys.exit(f"FAILED: the cluster's adapter for {size}x{size} differs from the local --threads 1 adapter")
        if rep == 0:
            first = seconds_ray
            continue
        runs["local"].append(seconds)
        runs["local-1"].append(seconds_1)
        runs["ray"].append(seconds_ray)
    shutil.rmtree(tmp / f"pair-{size}")
    medians = {k: statistics.median(v) for k, v in runs.items()}
    medians["ray-first"] = first or 0.0
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256,512,1024,1536", help="square matrix sizes (comma-separated)")
    parser.add_argument("--count", type=int, default=12, help="matrices per pair (default 12)")
    parser.add_argument("--method", default="exact", choices=("auto", "exact", "randomized"))
    parser.add_argument("--repeat", type=int, default=2, help="measured runs per size, after one warm-up")
    args = parser.parse_args()
    import ray

    print(f"# python bench/cluster.py {' '.join(sys.argv[1:])}")
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, torch {torch.__version__}")
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    print(f"  Ray started in {time.perf_counter() - started:.1f} s (2 CPUs, not counted below)")
    tmp = Path(tempfile.mkdtemp(prefix="lorasurgeon-cluster-"))
    rows = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            m = measure(size, args, tmp)
            rows.append((size, m))
            print(f"  {size}: " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    print(f"\n{args.count} matrices per run, rank {RANK}, --method {args.method}; medians of {args.repeat} runs\n")
    print("| size | local (all threads) s | local --threads 1 s | ray 2 workers s | first ray run s "
          "| ray / local | ray / local-1 | ray − local-1 per matrix ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for size, m in rows:
        overhead = (m["ray"] - m["local-1"]) / args.count * 1000  # per matrix, against the same work run here
        print(
            f"| {size}x{size} | {m['local']:.2f} | {m['local-1']:.2f} | {m['ray']:.2f} | {m['ray-first']:.2f} "
            f"| {m['ray'] / m['local']:.2f} | {m['ray'] / m['local-1']:.2f} | {overhead:.0f} |"
        )
    print(f"\n# load average {os.getloadavg()[0]:.2f} at the end; every cluster adapter byte-identical to local")


if __name__ == "__main__":
    main()
