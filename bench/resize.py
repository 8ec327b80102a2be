"""Resize / federated benchmark of issue 15: the QR-core route (lorasurgeon.factored) vs the dense-SVD route.

    python bench/resize.py [--layers 32] [--hidden 4096] [--intermediate 11008] [--rank 128] [--new-rank 16]
                           [--clients 100] [--client-rank 16] [--rss-clients 25,50,100] [--rss-layers 1]
                           [--dense-all] [--skip-federated] [--skip-resize] [--quick]

Maths only: adapters are generated in memory (seeded), no files are read or written, so both routes see the
same fp32 factors and the timings are of the algebra the `resize` / `combine` commands will run per module.

Part 1, resize: a rank-`--rank` adapter on the 7 projections of every layer of a Llama-shaped model
(q/k/v/o hidden², gate/up intermediate×hidden, down hidden×intermediate; 224 modules at the defaults),
B with column scales i^-0.5 so the spectrum decays, cut to `--new-rank`:
  - ours: the command's route (`stacked_sum.StackedSum` of one term, `truncated`: fp64 QR of the smaller factor in
    place, TSQR of the larger, SVD of the r×r core), every module;
  - dense (kohya's resize_lora.py): ΔW = B @ A in fp32, `torch.linalg.svd(ΔW)` (full_matrices=True, its
    default), keep the top k. Run on ONE module of each distinct shape (or every module with --dense-all) and
    scaled by the number of modules of that shape; the output says which.
  Errors ‖ΔW − B'A'‖_F are measured densely (fp64) on the sampled modules for both routes and divided by the
  Eckart–Young optimum √(Σ_{i>k} σᵢ²) from the dense route's own σ (fp32: ratios carry ~1e-6 of rounding).
Part 2, federated: `--clients` rank-`--client-rank` clients per module (a shared component plus a per-client
drift, weights = random sample counts, normalised: FedAvg), streamed one client at a time into
`stacked_sum.StackedSum`, then `truncated` to `--new-rank` (the command's route; FedIT's error from the same
QR); total time against the scaled dense resize route of part 1 ("one dense SVD route"). Checked on the first
module against a dense fp64 sum and its svdvals (after the peak RSS was read), with FedIT's naive A/B-average
error printed for it. Peak RSS for `--rss-clients` client counts, each in a fresh child process over
`--rss-layers` layers, shows how memory grows with the number of clients.

Every part runs in a child process of this (small, torch-free) one, which reports its own peak RSS
(getrusage); this process only prints. Timings exclude generating the factors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(m, n) = (out, in) of each projection, PEFT layout."""
    square, up, down = (hidden, hidden), (intermediate, hidden), (hidden, intermediate)
    return dict(zip(PROJECTIONS, [square] * 4 + [up, up, down], strict=True))


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def adapter_factors(m: int, n: int, rank: int, seed: int) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
    b = torch.randn(m, rank, generator=generator) * decay * 0.02  # (m, r)
    a = torch.randn(rank, n, generator=generator) / n**0.5  # (r, n)
    return b, a


Seconds = tuple[float, float]  # (wall, CPU of this process): on a shared machine the CPU time is the steadier


def clock() -> Seconds:
    return time.perf_counter(), time.process_time()


def since(start: Seconds) -> Seconds:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def add(total: Seconds, more: Seconds, times: int = 1) -> Seconds:
    return total[0] + times * more[0], total[1] + times * more[1]


def dense_route(b: Any, a: Any, scale: float, k: int) -> tuple[Seconds, Any, Any, Any, Any]:
    """kohya's resize: (seconds, ΔW, B', A', σ) with ΔW formed in fp32 and a full SVD of it."""
    import torch

    start = clock()
    delta = (b @ a).mul_(scale)  # (m, r) @ (r, n) -> (m, n)
    u, sigma, vh = torch.linalg.svd(delta)  # full_matrices=True, as resize_lora.py calls it
    b_new, a_new = u[:, :k] * sigma[:k], vh[:k]
    return since(start), delta, b_new, a_new, sigma


def error_ratio(delta: Any, b: Any, a: Any, sigma: Any, k: int) -> float:
    """‖ΔW − B·A‖_F / √(Σ_{i>k} σᵢ²), the residual in fp64 (an fp32 norm of 45M entries is off by ~1e-4)."""
    import torch

    residual = float(torch.linalg.matrix_norm(delta.double() - b.double() @ a.double()))
    return residual / float(sigma[k:].double().square().sum().sqrt())


def command_route(b: Any, a: Any, scale: float, k: int) -> Any:
    """What `lorasurgeon resize --rank k` runs per module: a one-term StackedSum, truncated (its QRs in place)."""
    from lorasurgeon.stacked_sum import StackedSum

    total = StackedSum(b.shape[0], a.shape[1], capacity=b.shape[1])
    total.add(b, a, scale)
    return total.truncated(k)[0]


def part_resize(args: argparse.Namespace) -> dict[str, Any]:
    from lorasurgeon import factored

    scale, k = 0.5, args.new_rank  # alpha = rank / 2
    table = shapes(args.hidden, args.intermediate)
    ours_total, worst_error = (0.0, 0.0), 0.0
    ours_by_shape: dict[tuple[int, int], list[Seconds]] = {}
    for layer in range(args.layers):
        for index, (name, (m, n)) in enumerate(table.items()):
            b, a = adapter_factors(m, n, args.rank, seed=layer * 7 + index)
            start = clock()
            out = command_route(b, a, scale, k)
            seconds = since(start)
            ours_total = add(ours_total, seconds)
            ours_by_shape.setdefault((m, n), []).append(seconds)
            worst_error = max(worst_error, factored.module_row(name, args.rank, out.sigma, k).error)
    ours_rss = peak_rss_mib()
    rows, dense_total = [], (0.0, 0.0)
    sampled: dict[tuple[int, int], int] = {}
    for layer in range(args.layers if args.dense_all else 1):
        for index, (name, (m, n)) in enumerate(table.items()):
            if not args.dense_all and (m, n) in sampled:
                continue
            sampled[(m, n)] = sampled.get((m, n), 0) + 1
            b, a = adapter_factors(m, n, args.rank, seed=layer * 7 + index)
            seconds, delta, b_dense, a_dense, sigma = dense_route(b, a, scale, k)
            ours = command_route(b, a, scale, k)
            optimum = float(sigma[k:].double().square().sum().sqrt() / sigma.double().square().sum().sqrt())
            count = len(ours_by_shape[(m, n)]) if not args.dense_all else 1
            dense_total = add(dense_total, seconds, count)
            mean = [sum(t[i] for t in ours_by_shape[(m, n)]) / len(ours_by_shape[(m, n)]) for i in (0, 1)]
            rows.append({"module": f"layers.{layer}.{name}", "shape": f"{m}x{n}", "dense_s": seconds,
                         "ours_s": mean, "scaled_by": count,
                         "optimum": optimum, "dense_ratio": error_ratio(delta, b_dense, a_dense, sigma, k),
                         "ours_ratio": error_ratio(delta, ours.b, ours.a, sigma, k)})  # fmt: skip
            del delta, b_dense, a_dense
    return {"modules": args.layers * 7, "ours_total_s": ours_total, "dense_total_s": dense_total,
            "dense_sampled": not args.dense_all, "rows": rows, "ours_rss_mib": ours_rss,
            "peak_rss_mib": peak_rss_mib(), "worst_table_error": worst_error}  # fmt: skip


def client_factors(m: int, n: int, rank: int, module_seed: int, client: int) -> tuple[Any, Any]:
    """A shared (B₀, A₀) of the module plus a per-client drift of 30%: a federated round's clients."""
    import torch

    b0, a0 = adapter_factors(m, n, rank, seed=10_000 + module_seed)
    generator = torch.Generator().manual_seed(1_000_000 * (module_seed + 1) + client)
    return b0 + 0.3 * b0.std() * torch.randn(m, rank, generator=generator), a0 + 0.3 * a0.std() * torch.randn(
        rank, n, generator=generator
    )


def part_federated(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lorasurgeon.stacked_sum import StackedSum

    counts = torch.randint(100, 1000, (args.clients,), generator=torch.Generator().manual_seed(0)).double()
    weights = (counts / counts.sum()).tolist()
    scale, total, check = 2.0, (0.0, 0.0), dict[str, Any]()
    for layer in range(args.layers):
        for index, (m, n) in enumerate(shapes(args.hidden, args.intermediate).values()):
            first = layer == 0 and index == 0 and args.check
            acc = StackedSum(m, n, capacity=args.clients * args.client_rank)
            b_mean = torch.zeros(m, args.client_rank, dtype=torch.float64) if first else None
            a_mean = torch.zeros(args.client_rank, n, dtype=torch.float64) if first else None
            for client, w in enumerate(weights):
                b, a = client_factors(m, n, args.client_rank, layer * 7 + index, client)
                start = clock()
                acc.add(b, a, w * scale)
                total = add(total, since(start))
                if b_mean is not None and a_mean is not None:
                    b_mean += w * scale * b.double()
                    a_mean += w * a.double()
            start = clock()
            naive = (b_mean, a_mean) if b_mean is not None and a_mean is not None else None
            out, fedit = acc.truncated(args.new_rank, naive=naive)  # the command's route: the QRs in place
            total = add(total, since(start))
            if naive is not None:
                check = {"naive": fedit, "out": out, "shape": (m, n)}
    result = {"clients": args.clients, "modules": args.layers * 7, "total_s": total, "peak_rss_mib": peak_rss_mib()}
    if check:  # after the peak RSS was read: the dense check's fp64 (m, n) sum is no part of the aggregation
        m, n = check["shape"]
        result.update(federated_check(args, m, n, weights, scale, check["out"], check["naive"]))
    return result


def federated_check(
    args: argparse.Namespace, m: int, n: int, weights: list[float], scale: float, out: Any, naive: float
) -> dict[str, float]:
    """The first module's result against the dense fp64 weighted sum and its svdvals (the optimum)."""
    import torch

    exact = torch.zeros(m, n, dtype=torch.float64)
    for client, w in enumerate(weights):
        b, a = client_factors(m, n, args.client_rank, 0, client)
        exact += (w * scale) * (b.double() @ a.double())
    sigma = torch.linalg.svdvals(exact)
    optimum = float(sigma[args.new_rank :].square().sum().sqrt())
    error = float(torch.linalg.matrix_norm(exact - out.b @ out.a))
    return {"check_error_ratio": error / optimum, "check_relative_error": optimum / float(sigma.norm()),
            "fedit_relative_error": naive}  # fmt: skip


def child(part: str, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """Run one part in a fresh process (so its getrusage peak is its own) and return its JSON."""
    argv = [sys.executable, __file__, "--part", part]
    for key, value in {**vars(args), **overrides}.items():
        if key in ("part", "quick") or value is False or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        argv += [flag] if value is True else [flag, text]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{part} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def pair(seconds: Seconds) -> str:
    return f"{seconds[0]:.2f} / {seconds[1]:.2f}"


def resize_report(args: argparse.Namespace) -> Seconds:
    """Part 1's table; returns the dense route's (scaled) seconds."""
    r = child("resize", args)
    how = "one module of each shape, scaled by its count" if r["dense_sampled"] else "every module"
    print(f"## resize rank {args.rank} -> {args.new_rank}, {r['modules']} modules (dense route on {how})\n")
    print("| module | shape | dense s | ours s (mean of shape) | x modules | optimum rel. err | dense / opt "
          "| ours / opt |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for row in r["rows"]:
        print(f"| {row['module']} | {row['shape']} | {pair(row['dense_s'])} | {pair(row['ours_s'])} | "
              f"{row['scaled_by']} | {row['optimum']:.4f} | {row['dense_ratio']:.6f} | "
              f"{row['ours_ratio']:.6f} |")  # fmt: skip
    dense, ours = r["dense_total_s"], r["ours_total_s"]
    print(f"\nours, all {r['modules']} modules: {pair(ours)} s (peak RSS {r['ours_rss_mib']:.0f} MiB); dense route"
          f"{' (scaled)' if r['dense_sampled'] else ''}: {pair(dense)} s (peak RSS with it {r['peak_rss_mib']:.0f} "
          f"MiB); dense / ours: {dense[0] / ours[0]:.1f}x wall, {dense[1] / ours[1]:.1f}x CPU; worst error ratio "
          f"{max(row['ours_ratio'] for row in r['rows']):.6f}\n")  # fmt: skip
    return dense


def report(args: argparse.Namespace) -> None:
    print(f"# resize / federated benchmark ({platform.machine()}, {os.cpu_count()} CPUs; hidden {args.hidden}, "
          f"intermediate {args.intermediate}, {args.layers} layers; times are wall s / CPU s)\n")  # fmt: skip
    dense = None
    if not args.skip_resize:
        dense = resize_report(args)
    if args.skip_federated:
        return
    f = child("federated", args, check=True)
    print(f"## federated mean of {f['clients']} rank-{args.client_rank} clients -> rank {args.new_rank}, "
          f"{f['modules']} modules\n")  # fmt: skip
    fed = f["total_s"]
    print(f"streamed, exact: {pair(fed)} s, peak RSS {f['peak_rss_mib']:.0f} MiB", end="")
    if dense is not None:
        print(f"; the dense resize route above takes {dense[0] / fed[0]:.1f}x (wall), {dense[1] / fed[1]:.1f}x (CPU) "
              "as long", end="")  # fmt: skip
    print()
    print(f"first module: error / Eckart-Young optimum (dense fp64) {f['check_error_ratio']:.8f} (relative error "
          f"{f['check_relative_error']:.4f}); FedIT's A/B average would be off by "
          f"{f['fedit_relative_error']:.4f}\n")  # fmt: skip
    print(f"peak RSS against the number of clients ({args.rss_layers} layer(s), fresh process each):\n")
    print("| clients | stacked rank of the largest module | algebra s | peak RSS MiB |\n|---|---|---|---|")
    for clients in args.rss_clients:
        s = child("federated", args, clients=clients, layers=args.rss_layers)
        print(f"| {clients} | {clients * args.client_rank} | {pair(s['total_s'])} | {s['peak_rss_mib']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["resize", "federated"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--new-rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--client-rank", type=int, default=16)
    parser.add_argument("--rss-clients", type=lambda s: [int(x) for x in s.split(",")], default=[25, 50, 100])
    parser.add_argument("--rss-layers", type=int, default=1)
    parser.add_argument("--dense-all", action="store_true", help="run the dense route on every module")
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--skip-resize", action="store_true", help="only the federated part (no dense route)")
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1376, 4 layers, 20 clients")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.clients = 512, 1376, 4, 20
        args.rss_clients = [5, 10, 20] if args.rss_clients == [25, 50, 100] else args.rss_clients
    if args.part is None:
        report(args)
        return
    result = part_resize(args) if args.part == "resize" else part_federated(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
