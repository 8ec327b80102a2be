"""Merge benchmark (issues 2 and 17): lorasurgeon merge against two copies of the same checkpoint (the floors)
and the PEFT route, with the inputs in the page cache (warm) and out of it (cold).

    python bench/merge.py [--size-gb 1.67] [--repeat 3] [--cache warm,cold] [--peft] [--device cpu|cuda]
                          [--threads N] [--tmp /tmp]

Builds, in a temporary directory that is removed afterwards, a Llama-shaped bf16 checkpoint (TinyLlama-1.1B
geometry: hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, as many layers as fit in
--size-gb; 1.67 GB is the 16-layer, 1.56 GiB checkpoint of issue 17) in Hugging Face layout with ~500 MB
shards, and an r=16 PEFT adapter (fp32, B != 0) on all seven projections. The contenders, each a fresh
process (imports included, as a user runs them):

- durable copy: safetensors load_file + save_file + fsync of each shard (the floor a merge is held to);
- page-cache copy: the same without the fsyncs (what a copy costs when nobody waits for the disk);
- `lorasurgeon merge BASE ADAPTER -o OUT` (fsyncs every file before it publishes OUT);
- with --peft, the PEFT route (from_pretrained + PeftModel + merge_and_unload + save_pretrained + fsync).

Per repeat and cache state the contenders run in a rotating order. Warm: every input file is read once just
before each measurement. Cold: the inputs' pages are dropped from the page cache before each measurement
(posix_fadvise DONTNEED on each input file after a sync: no root needed, and other processes' caches stay).
Before every measurement all dirty pages are flushed (`sync`), so no run pays for another's writes. Wall time,
the child's user + system CPU time and its peak RSS come from `wait4` through a launcher that imports nothing.
CPU time is the figure to trust on a shared machine: wall time there measures the other processes too.
The first merge is checked: merged tensors bit-equal to fp32(W) + scale·B@A rounded once (and, with --peft,
within 1 bf16 ulp of PEFT's), changed from the base; untouched tensors bit-equal to the base.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
RANK, ALPHA = 16, 32
SHARD_BYTES = 500 * 10**6
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONTENDERS = ("copy", "cache-copy", "merge", "peft")
CACHES = ("warm", "cold")

# Measures one command from a tiny process. A child's ru_maxrss also counts the memory of the process it was
# forked (or vforked) from, up to its exec: spawned straight from this script, which holds ~1 GB after building
# the fixture, every contender would read >= 1 GB. This launcher imports no torch (~10 MB), so the command it
# spawns reports its own peak; it prints the command's output, then one JSON line with wall time, CPU time and peak RSS.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
cpu = usage.ru_utime + usage.ru_stime
print("\\n" + json.dumps({"seconds": seconds, "cpu": cpu, "maxrss_kib": usage.ru_maxrss}), flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""
MB = 2**20  # ru_maxrss is in KiB on Linux; tables report MiB ("MB")


@dataclass(frozen=True)
class Measurement:
    contender: str
    cache: str
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float


# ---------------------------------------------------------------------------------------------------- fixture


def layer_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one decoder layer."""
    kv = HIDDEN // HEADS * KV_HEADS
    return {
        "self_attn.q_proj": (HIDDEN, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }


def layers_for(size_gb: float) -> int:
    """How many decoder layers make a bf16 checkpoint of about `size_gb` GB."""
    per_layer = 2 * (sum(o * i for o, i in layer_shapes().values()) + 2 * HIDDEN)
    embeddings = 2 * 2 * VOCAB * HIDDEN  # embed_tokens + untied lm_head
    return max(1, round((size_gb * 1e9 - embeddings) / per_layer))


def base_shapes(layers: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order transformers saves a LlamaForCausalLM."""
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        for name, shape in layer_shapes().items():
            yield f"model.layers.{i}.{name}.weight", shape
        yield f"model.layers.{i}.input_layernorm.weight", (HIDDEN,)
        yield f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def llama_config(layers: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def write_base(root: Path, layers: int) -> None:
    """config.json, model-0000N-of-0000M.safetensors shards of ~500 MB, model.safetensors.index.json."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in base_shapes(layers):
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, group in enumerate(groups, start=1):
        shard = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_weight(name, shape, generator) for name, shape in group}
        save_file(tensors, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(0.8, 1.2, generator=generator)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def write_adapter(root: Path, base: Path, layers: int) -> None:
    """A PEFT LoRA directory: r=16, alpha=32, all seven projections, fp32 factors, B != 0."""
    root.mkdir()
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name, (out, inp) in layer_shapes().items():
            key = f"base_model.model.model.layers.{i}.{name}"
            # |B @ A · scale| ~ 4e-4 per element vs |W| ~ 0.02: a few bf16 ulps, so the merge changes W.
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.005
    save_file(tensors, root / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))


# ------------------------------------------------------------------------------------ contenders (child side)


def child_copy(base: str, out: str, durable: str = "1") -> None:
    """A floor: load_file + save_file of each shard, one shard at a time; fsync'd per shard when `durable`."""
    Path(out).mkdir()
    for shard in sorted(Path(base).glob("*.safetensors")):
        tensors = load_file(shard)
        save_file(tensors, Path(out) / shard.name, metadata={"format": "pt"})
        del tensors
        if durable == "1":
            fsync_path(Path(out) / shard.name)


def child_peft(base: str, adapter: str, out: str, device: str) -> None:
    """The PEFT route as users write it: from_pretrained + PeftModel + merge_and_unload + save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for path in Path(out).rglob("*"):
        if path.is_file():
            fsync_path(path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


CHILDREN: dict[str, Callable[..., None]] = {"_copy": child_copy, "_peft": child_peft}


# ------------------------------------------------------------------------------------ measuring (parent side)


def command(contender: str, base: Path, adapter: Path, out: Path, device: str) -> list[str]:
    script = str(Path(__file__).resolve())
    if contender in ("copy", "cache-copy"):
        return [sys.executable, script, "_copy", str(base), str(out), "1" if contender == "copy" else "0"]
    if contender == "peft":
        return [sys.executable, script, "_peft", str(base), str(adapter), str(out), device]
    cli = Path(sys.executable).with_name("lorasurgeon")  # the console script itself, not a pyenv shim
    exe = str(cli) if cli.exists() else (shutil.which("lorasurgeon") or "lorasurgeon")
    return [exe, "merge", str(base), str(adapter), "-o", str(out), "--device", device]


def set_cache(inputs: list[Path], cache: str) -> None:
    """Flush every dirty page, then put the inputs' pages in the page cache (warm) or drop them (cold)."""
    os.sync()
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cache == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 64 << 20):
                    pass
        finally:
            os.close(fd)


def measure(contender: str, cache: str, argv: list[str], log: Path, inputs: list[Path]) -> Measurement:
    """Run `argv` in a fresh grandchild and return its wall time, CPU time and own peak RSS (see LAUNCHER)."""
    set_cache(inputs, cache)
    with log.open("wb") as sink:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{contender} failed (exit {done.returncode}):\n{log.read_text()[-4000:]}")
    record = json.loads(log.read_text().splitlines()[-1])
    return Measurement(contender, cache, record["seconds"], record["cpu"], record["maxrss_kib"] * 1024 / MB)


def inputs_of(base: Path, adapter: Path) -> list[Path]:
    """The files a merge reads (whose page-cache state `measure` sets)."""
    return sorted(p for root in (base, adapter) for p in root.iterdir() if p.is_file())


def run_all(tmp: Path, base: Path, adapter: Path, args: argparse.Namespace) -> list[Measurement]:
    contenders = [c for c in CONTENDERS if c != "peft" or args.peft]
    inputs = inputs_of(base, adapter)
    results: list[Measurement] = []
    for rep in range(args.repeat):
        for cache in args.cache:
            shift = rep % len(contenders)
            order = contenders[shift:] + contenders[:shift]  # rotate so no contender always goes first
            outs = {c: tmp / f"out-{c}-{rep}-{cache}" for c in order}
            for contender in order:
                argv = command(contender, base, adapter, outs[contender], args.device)
                m = measure(contender, cache, argv, tmp / f"{contender}-{rep}.log", inputs)
                print(
                    f"  repeat {rep + 1}/{args.repeat} {cache}  {contender:<10} {m.seconds:7.2f} s wall  "
                    f"{m.cpu_seconds:6.2f} s CPU  {m.peak_rss_mb:6.0f} MB  (load {os.getloadavg()[0]:.1f})"
                )
                results.append(m)
            if rep == 0 and cache == args.cache[0]:
                verify(base, adapter, outs["merge"], outs.get("peft"))
            for out in outs.values():
                shutil.rmtree(out)
    return results


def stack_bench(
    args: argparse.Namespace,
    write_base: Callable[[Path, int, int], None],
    write_adapter: Callable[[Path, int, int], None],
    check: Callable[[Path, Path, Path, Path], None],
    target: float,
    merge_argv: Callable[[Path, Path, Path, Path], list[str]] | None = None,
) -> None:
    """The main of a layer-stack benchmark (bench/moe_merge.py, bench/fp8_merge.py): build `args.layers` layers of
    `args.experts` experts, then copy and merge alternately (`args.repeat` times each, a fresh process each run),
    `check(base, adapter, merged, tmp)` the first merge, and print the medians against `target` (merge / copy).
    `merge_argv(base, adapter, out, tmp)` replaces the plain merge command."""
    script = Path(sys.argv[0]).name
    print(f"# python bench/{script} {' '.join(sys.argv[1:])}")
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
        f"torch {torch.__version__}"
    )
    tmp = Path(tempfile.mkdtemp(prefix=f"lorasurgeon-{Path(script).stem}-", dir=args.tmp))
    contenders = ("copy", "merge")
    results: list[Measurement] = []
    try:
        start = time.perf_counter()
        base, adapter = tmp / "base", tmp / "adapter"
        write_base(base, args.layers, args.experts)
        write_adapter(adapter, args.layers, args.experts)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(
            f"  built {args.layers} layers x {args.experts} experts, {size / 1e9:.2f} GB, "
            f"in {time.perf_counter() - start:.0f} s"
        )
        for rep in range(args.repeat):
            for contender in contenders if rep % 2 == 0 else contenders[::-1]:
                out = tmp / f"out-{contender}"
                argv = command(contender, base, adapter, out, args.device)
                if contender == "merge" and merge_argv is not None:
                    argv = merge_argv(base, adapter, out, tmp)
                m = measure(contender, "warm", argv, tmp / f"{contender}.log", inputs_of(base, adapter))
                print(
                    f"  repeat {rep + 1}/{args.repeat}  {contender:<5} {m.seconds:7.2f} s wall  "
                    f"{m.cpu_seconds:6.2f} s CPU  {m.peak_rss_mb:8.0f} MB"
                )
                results.append(m)
                if contender == "merge" and rep == 0:
                    check(base, adapter, out, tmp)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = {c: statistics.median(m.seconds for m in results if m.contender == c) for c in contenders}
    rss = {c: max(m.peak_rss_mb for m in results if m.contender == c) for c in contenders}
    print("\n| contender | runs | wall s (median) | wall s (min-max) | peak RSS MB (max) |\n|---|---|---|---|---|")
    for c in contenders:
        times = [m.seconds for m in results if m.contender == c]
        print(f"| {c} | {len(times)} | {wall[c]:.2f} | {min(times):.2f}-{max(times):.2f} | {rss[c]:.0f} |")
    ratio = wall["merge"] / wall["copy"]
    print(f"\nmerge / copy wall time: {ratio:.2f} (target <= {target}: {'met' if ratio <= target else 'missed'})")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


# ---------------------------------------------------------------------------------------------- verification


def read_tensor(root: Path, name: str) -> torch.Tensor:
    index = root / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(root / shard, framework="pt") as f:
        tensor: torch.Tensor = f.get_tensor(name)
    return tensor


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in bf16 steps: bit patterns mapped to an ordered integer line (±0 both 0)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _spread(dist: torch.Tensor) -> str:
    return f"max {int(dist.max())} ulp ({float((dist > 0).float().mean()):.3%} differ)"


def verify(base: Path, adapter: Path, merged: Path, peft: Path | None) -> None:
    """lorasurgeon == PEFT within 1 ulp, == the once-rounded fp32 reference, != base; untouched stays bit-equal."""
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    picks = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    names = [f"model.layers.{i * (layers - 1) // 2}.{p}" for i, p in enumerate(picks)]
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        factors = {
            n: (
                f.get_tensor(f"base_model.model.{n}.lora_A.weight"),
                f.get_tensor(f"base_model.model.{n}.lora_B.weight"),
            )
            for n in names
        }
    failures = []
    for name in names:
        w, ours = (read_tensor(root, f"{name}.weight") for root in (base, merged))
        a, b = factors[name]
        reference = (w.float() + (b @ a) * (ALPHA / RANK)).to(torch.bfloat16)
        off = ulps(ours, reference)
        theirs = f", {_spread(ulps(ours, read_tensor(peft, f'{name}.weight')))} vs PEFT" if peft else ""
        print(
            f"  verify {name}: {_spread(off)} vs fp32 W + scale·B@A rounded once{theirs}, "
            f"{float((ours != w).float().mean()):.0%} changed from base"
        )
        # 1 ulp from PEFT, not 0: a valid merge may sum in another order (e.g. a fused addmm), moving a few ties.
        far = peft is not None and ulps(ours, read_tensor(peft, f"{name}.weight")).max() > 1
        if far or off.max() > 0 or torch.equal(ours, w):
            failures.append(name)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if not torch.equal(read_tensor(base, name), read_tensor(merged, name)):
            failures.append(name)
    if failures:
        sys.exit(f"VERIFICATION FAILED for {', '.join(failures)}: the benchmark measured a wrong merge")
    peft_words = " and within 1 ulp of PEFT" if peft else ""
    print(f"  verify: OK (3 merged tensors bit-equal to the reference{peft_words}; embed_tokens, lm_head bit-equal)")


# --------------------------------------------------------------------------------------------------- report


def largest_tensor_mb(layers: int) -> float:
    return max(2 * torch.Size(shape).numel() for _, shape in base_shapes(layers)) / MB


def report(results: list[Measurement], layers: int, caches: list[str]) -> bool:
    """Print the Markdown tables and the targets; True when every target is met."""
    contenders = [c for c in CONTENDERS if any(m.contender == c for m in results)]
    labels = {
        "copy": "durable copy: load_file + save_file + fsync per shard",
        "cache-copy": "page-cache copy: load_file + save_file",
        "merge": "`lorasurgeon merge BASE ADAPTER -o OUT`",
        "peft": "PEFT: from_pretrained + merge_and_unload + save_pretrained",
    }
    wall: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    print("\n| cache | contender | runs | wall s median (min-max) | CPU s median | peak RSS MB (max) |")
    print("|---|---|---|---|---|---|")
    for cache in caches:
        for c in contenders:
            rows = [m for m in results if m.contender == c and m.cache == cache]
            times = [m.seconds for m in rows]
            wall[c, cache] = statistics.median(times)
            cpu[c, cache] = statistics.median(m.cpu_seconds for m in rows)
            rss = max(m.peak_rss_mb for m in rows)
            print(
                f"| {cache} | {labels[c]} | {len(rows)} | {wall[c, cache]:.2f} ({min(times):.2f}-{max(times):.2f}) "
                f"| {cpu[c, cache]:.2f} | {rss:.0f} |"
            )
    budget = 3 * largest_tensor_mb(layers) + 300
    merge_rss = max(m.peak_rss_mb for m in results if m.contender == "merge")
    targets = []
    for cache in caches:
        ratio = wall["merge", cache] / wall["copy", cache]
        targets.append((f"{cache}: merge / durable copy, wall", ratio, "<= 1.3", ratio <= 1.3))
        ratio = wall["merge", cache] / wall["cache-copy", cache]
        targets.append((f"{cache}: merge / page-cache copy, wall", ratio, "<= 2", ratio <= 2))
    targets.append((f"merge peak RSS / (3 x largest tensor + 300 MB = {budget:.0f} MB)", merge_rss / budget, "<= 1",
                    merge_rss <= budget))  # fmt: skip
    print("\n| target | measured | wanted | |\n|---|---|---|---|")
    for label, value, wanted, ok in targets:
        print(f"| {label} | {value:.3f} | {wanted} | {'met' if ok else '**missed**'} |")
    for cache in caches:
        print(f"\n{cache}, CPU seconds (load-independent-ish): merge {cpu['merge', cache]:.2f}, durable copy "
              f"{cpu['copy', cache]:.2f}, page-cache copy {cpu['cache-copy', cache]:.2f}")  # fmt: skip
    return all(ok for *_, ok in targets)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.67, help="approximate checkpoint size (default 1.67)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender per cache state (default 3)")
    parser.add_argument("--cache", default="warm,cold", help="cache states to measure: warm, cold or both")
    parser.add_argument("--peft", action="store_true", help="also run the PEFT route (slow, 2.5 GB of RSS)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="for lorasurgeon and PEFT")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every contender (default: torch's own)")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where to build (default /tmp)")
    parser.add_argument("--fixture", type=Path, help="keep the checkpoint and adapter here (built if missing)")
    args = parser.parse_args()
    args.cache = [c for c in args.cache.split(",") if c]
    if not args.cache or set(args.cache) - set(CACHES):
        parser.error(f"--cache: expected a comma-separated list of {', '.join(CACHES)}")
    return args


def main() -> None:
    args = parse_args()
    layers = layers_for(args.size_gb)
    if args.threads:  # the children inherit it; this process has already sized its own pool
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    print(f"# {' '.join(['python', 'bench/merge.py', *sys.argv[1:]])}")
    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
        f"torch {torch.__version__}, caches {','.join(args.cache)}, device {args.device}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="lorasurgeon-bench-", dir=args.tmp))
    try:
        start = time.perf_counter()
        root = args.fixture or tmp
        base, adapter = root / "base", root / "adapter"
        if not (base / "model.safetensors.index.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(adapter, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            write_base(base, layers)
            write_adapter(adapter, base, layers)
        layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(
            f"  {layers} layers, {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards, "
            f"adapter r={RANK} on {len(PROJECTIONS)} projections, ready in {time.perf_counter() - start:.0f} s"
        )
        results = run_all(tmp, base, adapter, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    met = report(results, layers, args.cache)
    print(f"\n# load average {os.getloadavg()[0]:.2f} at the end; {'all targets met' if met else 'targets missed'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        CHILDREN[sys.argv[1]](*sys.argv[2:])
    else:
        main()
