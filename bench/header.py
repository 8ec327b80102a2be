"""Header benchmark of issue 12: one 20,000-tensor header (a 70B checkpoint in one file), read three ways.

    python bench/header.py [--tensors 20000] [--repeat 20]

- floor: `safetensors.safe_open` on the file, every tensor's dtype and shape and the metadata read;
- ours, fast path: `lorasurgeon.header.read_header` on a header as safetensors and lorasurgeon write them
  (json.loads, then a count that proves no key was lost to a duplicate);
- ours, strict path: the same header with one escaped character in one tensor name (an escaped emoji, as Python's
  json.dumps writes it), which sends it through the duplicate- and surrogate-checking parse.
The file's tensor data is a sparse hole, so the file takes a few MB of disk. Prints the median and best CPU
time of each over --repeat runs (process time: the machine is shared) and the ratios to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from lorasurgeon.header import build_header, nbytes_of, read_header

BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm", "norm"]


def build(path: Path, tensors: int, escaped: bool) -> None:
    entries = [(f"model.layers.{i // 9}.{BLOCK[i % 9]}.weight", "BF16", (128, 64)) for i in range(tensors)]
    header = build_header(entries, {"format": "pt"})
    if escaped:  # one name spelled with an escape, as Python's json.dumps would: still a valid header
        text = header[8:].replace(b"model.layers.0.q_proj", b"model.layers.0.q_proj\\ud83d\\ude00", 1)
        text += b" " * (-len(text) % 8)
        header = struct.pack("<Q", len(text)) + text
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(nbytes_of(d, s) for _, d, s in entries))


def floor(path: Path) -> int:
    with safe_open(path, "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118 - safe_open is no mapping
        f.metadata()
    return len(shapes)


def ours(path: Path) -> int:
    return len(read_header(path).tensors)


def timed(fn: Callable[[Path], int], path: Path, repeat: int) -> list[float]:
    fn(path)  # warm-up: page cache, imports
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn(path)
        times.append(time.process_time() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, escaped = Path(tmp) / "plain.safetensors", Path(tmp) / "escaped.safetensors"
        build(plain, args.tensors, escaped=False)
        build(escaped, args.tensors, escaped=True)
        assert floor(plain) == ours(plain) == ours(escaped) == args.tensors
        rows = {
            "safe_open (floor)": timed(floor, plain, args.repeat),
            "read_header, fast path": timed(ours, plain, args.repeat),
            "read_header, strict path": timed(ours, escaped, args.repeat),
        }
    base = statistics.median(rows["safe_open (floor)"])
    print(f"{args.tensors} tensors, {args.repeat} runs each (CPU time)")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"  {name:26s} median {median * 1e3:7.1f} ms  best {min(times) * 1e3:7.1f} ms  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
