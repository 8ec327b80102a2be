"""Where the randomized SVD gets cheaper than the exact one: the measurement behind `extract --method auto`.

    python bench/svd_crossover.py [--sides 128,256,...] [--ranks 8,16,64] [--aspects 1,4] [--largest 4096]
                                  [--repeat 3] [--threads N]

For each shape (min side × aspect) and rank, one fp32 ΔW with a slowly decaying spectrum (σ_i ∝ i^-0.5 over
its first directions plus a dense noise floor, as bench/extract.py; the hard case for a range finder, which
then needs the most power iterations) is factorised both ways through lorasurgeon.decomposition.svd, the
function extract calls, in this process:
  - exact: torch.linalg.svd(full_matrices=False);
  - randomized: lorasurgeon's range finder (sketch r + max(r, 16), power iterations until converged).
The exact SVD's time does not depend on the rank, so it is measured once per matrix; each time is the best of
--repeat runs (the minimum is the least disturbed by other load on the machine). The error of the rank-r
factors is measured against the Eckart–Young optimum (from the exact SVD's singular values). Where randomized
starts to win, as a ratio min side / (sketch + oversampling), is what decomposition.RANDOMIZED_FROM encodes.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorasurgeon import decomposition, linalg
from lorasurgeon.rank_rule import RankRule


def spectrum_delta(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(m, n) fp32 with σ_i ≈ i^-0.5 on min(m, n, 1024) random directions plus a flat floor of dense noise."""
    k = min(m, n, 1024)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    noise = torch.randn(m, n, generator=generator) * (0.02 / (m * n) ** 0.25)
    return (u * sigma) @ v.T + noise


def timed(delta: torch.Tensor, method: str, rank: int, repeat: int) -> tuple[float, float, str]:
    """(best seconds, ‖ΔW − BA‖_F, method used) of decomposition.svd with `method` at `rank`."""
    rule = RankRule(rank=rank, method=method)
    best, error, used = float("inf"), 0.0, ""
    for _ in range(repeat):
        started = time.perf_counter()
        u, s, vh, used = decomposition.svd(delta, rule, rank, torch.Generator().manual_seed(0))
        b, a = linalg.split_factors(u, s, vh, rank, 1.0)
        best = min(best, time.perf_counter() - started)
        error = float(torch.linalg.matrix_norm(torch.addmm(delta, b, a, alpha=-1.0)).item())
    return best, error, used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default="128,256,384,512,768,1024,1536,2048")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--aspects", default="1,4", help="n / m of each (m, n) matrix")
    parser.add_argument("--largest", type=int, default=4096, help="skip matrices with a side above this")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice, as extract runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = [int(x) for x in args.sides.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    aspects = [float(x) for x in args.aspects.split(",")]
    load = os.getloadavg()[0]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (load {load:.1f} at start), torch {torch.__version__}")
    print(f"with {torch.get_num_threads()} threads; best of {args.repeat} runs per cell.\n")
    print("| shape | rank | sketch | side / sketch | exact s | randomized s | exact / randomized | randomized / opt |")
    print("|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for side in sides:
        for aspect in aspects:
            m, n = side, int(side * aspect)
            if n > args.largest:
                continue
            delta = spectrum_delta(m, n, generator)
            exact_s = timed(delta, "exact", 1, args.repeat)[0]
            for rank in ranks:
                sketch = rank + max(rank, 16)
                if sketch >= side:
                    continue
                optimum = timed(delta, "exact", rank, 1)[1]
                fast_s, error, used = timed(delta, "randomized", rank, args.repeat)
                note = "" if used == "randomized" else f" ({used})"
                print(
                    f"| {m}x{n} | {rank} | {sketch} | {side / sketch:.1f} | {exact_s:.3f} | {fast_s:.3f}{note} | "
                    f"{exact_s / fast_s:.2f}x | {error / optimum:.5f} |",
                    flush=True,
                )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
