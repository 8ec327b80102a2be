"""Time lorasurgeon.fp8 on one DeepSeek-shaped matrix: dequantize, quantize, and the merge in format
(dequantize + add + per-block scale choice + quantize + survival figures) on its CPU route (lorasurgeon.fp8_kernel)
and on the torch route CUDA takes, run here on CPU; against a plain copy of its bytes and torch's own fp8 → fp32
cast (the dequantize before lorasurgeon decoded e4m3 by integer arithmetic). The merge's first call, which loads
its compiled loops, is not timed.

    python bench/fp8_block.py [--size 4096] [--block 128] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lorasurgeon import fp8, fp8_merge


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_route(q: torch.Tensor, s: torch.Tensor, delta: torch.Tensor, block: tuple[int, int]) -> object:
    """merge_fp8_block as CUDA runs it (torch operations), here on CPU."""
    kernel, fp8_merge._on_cpu = fp8_merge._on_cpu, fp8_merge._in_chunks
    try:
        return fp8_merge.merge_fp8_block(q, s, delta, block)
    finally:
        fp8_merge._on_cpu = kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, block = args.size, (args.block, args.block)
    q, s = fp8.quantize_blocks(torch.randn(n, n) * 0.02, block)
    w = fp8.dequantize_blocks(q, s, block)
    delta = torch.randn(n, 16) @ torch.randn(16, n)
    delta *= 0.01 * w.norm() / delta.norm()  # ‖ΔW‖ = 1% of ‖W‖
    merged = fp8_merge.merge_fp8_block(q, s, delta, block)
    timings = {
        "copy of the fp8 bytes": best(lambda: q.clone(), args.repeat),
        "torch's fp8 -> fp32 cast": best(lambda: q.float(), args.repeat),
        "dequantize": best(lambda: fp8.dequantize_blocks(q, s, block), args.repeat),
        "quantize (fresh scales)": best(lambda: fp8.quantize_blocks(w, block), args.repeat),
        "merge_fp8_block": best(lambda: fp8_merge.merge_fp8_block(q, s, delta, block), args.repeat),
        "  the torch route": best(lambda: torch_route(q, s, delta, block), args.repeat),
    }
    print(f"{n}x{n}, {block[0]}x{block[1]} blocks, {args.threads} threads, best of {args.repeat}:")
    for name, seconds in timings.items():
        print(f"  {name:26s} {seconds * 1e3:8.1f} ms  ({n * n / seconds / 1e6:7.1f} M elements/s)")
    print(
        f"  merge figures at ‖ΔW‖ = 1% ‖W‖: survival {merged.survival:.3f}, error {merged.error:.3f}, "
        f"{merged.rescaled} of {s.numel()} blocks rescaled"
    )


if __name__ == "__main__":
    main()
