"""The command path of issue 15: `lorasurgeon combine` over client adapters on disk, and `lorasurgeon resize`.

    python bench/combine.py [--layers 1] [--hidden 4096] [--intermediate 11008] [--clients 25,50,100]
                            [--client-rank 16] [--new-rank 16] [--resize-rank 128] [--dir DIR] [--keep]

Writes, in DIR (default: a temporary directory), N PEFT client adapters of rank `--client-rank` on the 7
projections of `--layers` Llama-shaped layers (fp32; a shared component plus a 30 % drift per client, as
bench/resize.py draws them) and `counts.json` of random sample counts, then times, each in a fresh process whose
peak RSS is read with wait4:

    lorasurgeon combine DIR/clients/*/ --weights DIR/counts.json --mean --rank 16 --report-naive -o DIR/global
    lorasurgeon resize DIR/r128 --rank 16 -o DIR/r16             (a rank-`--resize-rank` adapter of the same shape)

for each client count (the largest first clients of the same set). Wall times include Python, torch and reading
the clients; the first module of the global adapter is checked against the dense fp64 weighted sum (its error
over the Eckart–Young optimum). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resize import PROJECTIONS, adapter_factors, client_factors, shapes  # a sibling script

ROOT = Path(__file__).resolve().parent.parent


def write_adapter(path: Path, factors: dict[str, tuple[Any, Any]], rank: int) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, path / "adapter_model.safetensors", {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS)}
    (path / "adapter_config.json").write_text(json.dumps(config))


def modules(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(name, m, n, seed) of every module, in bench/resize.py's seeds."""
    table = shapes(args.hidden, args.intermediate)
    kind = {p: "self_attn" if p in PROJECTIONS[:4] else "mlp" for p in PROJECTIONS}
    return [
        (f"model.layers.{layer}.{kind[p]}.{p}", m, n, layer * 7 + index)
        for layer in range(args.layers)
        for index, (p, (m, n)) in enumerate(table.items())
    ]


def prepare(root: Path, args: argparse.Namespace) -> list[float]:
    import torch

    counts = torch.randint(100, 1000, (max(args.clients),), generator=torch.Generator().manual_seed(0)).tolist()
    for client in range(max(args.clients)):
        factors = {name: client_factors(m, n, args.client_rank, seed, client) for name, m, n, seed in modules(args)}
        write_adapter(root / "clients" / f"c{client:03d}", factors, args.client_rank)
    big = {name: adapter_factors(m, n, args.resize_rank, seed) for name, m, n, seed in modules(args)}
    write_adapter(root / "r128", big, args.resize_rank)
    return [float(c) for c in counts]


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a fresh process running `command`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing can block the child before wait4
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = status
        if status != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{err.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def check(root: Path, args: argparse.Namespace, weights: list[float], clients: int) -> float:
    """The first module of the global adapter: ‖ΔW − ΔW′‖_F over the optimum of the dense fp64 weighted sum."""
    import torch
    from safetensors.torch import load_file

    name, m, n, seed = modules(args)[0]
    total = sum(weights[:clients])
    exact = torch.zeros(m, n, dtype=torch.float64)
    for client in range(clients):
        b, a = client_factors(m, n, args.client_rank, seed, client)
        exact += (weights[client] / total * 2.0) * (b.double() @ a.double())
    config = json.loads((root / "global" / "adapter_config.json").read_text())
    tensors = load_file(root / "global" / "adapter_model.safetensors")
    rank = config["rank_pattern"].get(f"^{name}", config["r"])
    key = f"base_model.model.{name}"
    ours = (
        config["lora_alpha"]
        / rank
        * tensors[f"{key}.lora_B.weight"].double()
        @ tensors[f"{key}.lora_A.weight"].double()
    )
    sigma = torch.linalg.svdvals(exact)
    return float(torch.linalg.matrix_norm(exact - ours) / sigma[args.new_rank :].square().sum().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[25, 50, 100])
    parser.add_argument("--client-rank", type=int, default=16)
    parser.add_argument("--new-rank", type=int, default=16)
    parser.add_argument("--resize-rank", type=int, default=128)
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep DIR's adapters")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="lorasurgeon-combine-"))
    cli = [sys.executable, "-m", "lorasurgeon"]
    try:
        counts = prepare(root, args)
        print(f"# combine / resize through the command line ({args.layers} layer(s) of hidden {args.hidden}, "
              f"intermediate {args.intermediate}; {os.cpu_count()} CPUs)\n")  # fmt: skip
        seconds, rss = timed(
            [*cli, "resize", str(root / "r128"), "--rank", str(args.new_rank), "-o", str(root / "r16")]
        )
        print(f"resize rank {args.resize_rank} -> {args.new_rank}, {len(modules(args))} modules: {seconds:.1f} s, "
              f"peak RSS {rss:.0f} MiB\n")  # fmt: skip
        print(
            "| clients | stacked rank | wall s | peak RSS MiB | error / optimum (first module) |\n|---|---|---|---|---|"
        )
        for clients in args.clients:
            (root / "counts.json").write_text(
                json.dumps({f"{root}/clients/c{i:03d}": counts[i] for i in range(clients)})
            )
            paths = [str(root / "clients" / f"c{i:03d}") for i in range(clients)]
            shutil.rmtree(root / "global", ignore_errors=True)
            command = [*cli, "combine", *paths, "--weights", str(root / "counts.json"), "--mean", "--rank"]
            seconds, rss = timed([*command, str(args.new_rank), "--report-naive", "-o", str(root / "global")])
            ratio = check(root, args, counts, clients)
            print(f"| {clients} | {clients * args.client_rank} | {seconds:.1f} | {rss:.0f} | {ratio:.8f} |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
