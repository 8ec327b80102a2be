"""The command line's shared options: each defined once, with its help text, for every command that takes it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

import lorasurgeon

DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
DTYPE = click.option(
    "--dtype",
    type=click.Choice(list(lorasurgeon.DTYPE_CHOICES)),
    default="keep",
    show_default=True,
    help="dtype of every floating-point output tensor; keep leaves each tensor's own.",
)
ALPHA = click.option("--alpha", type=float, help="lora_alpha, for adapters without adapter_config.json.")
SCALE = click.option("--scale", type=float, default=1.0, show_default=True, help="Multiplies the adapter's scale.")
FORCE = click.option(
    "--force", is_flag=True, help="Replace OUT if it exists (the old one stays until the new is done)."
)
DRY_RUN = click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
ALLOW_NONFINITE = click.option(
    "--allow-nonfinite", is_flag=True, help="Write NaN/Inf from the inputs through, warning by tensor name."
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
FC = TypeVar("FC", bound=Callable[..., Any])


def output_option(default: str) -> Callable[[FC], FC]:
    return click.option("-o", "--out", type=click.Path(path_type=Path), help=f"Output path (default: {default}).")


OUT = output_option("<base>-merged")
EXISTING = click.Path(exists=False, path_type=Path)
BASE_NAME = click.option(
    "--base-name",
    metavar="NAME",
    help="base_model_name_or_path to record in adapter_config.json (a Hub repo id; default: BASE as given).",
)
PATTERNS = (
    "Write PEFT's rank_pattern / alpha_pattern / rsLoRA form (PEFT only) instead of one lora_alpha with the "
    "per-module scales folded into B, which every runtime reads."
)
SERVER = (
    click.option("--max-lora-rank", type=int, help="vllm, sglang: the server's --max-lora-rank (vLLM's default: 16)."),
    click.option("--world-size", type=int, help="tgi, lorax: the number of shards (ranks are padded per shard)."),
    click.option("--peft-version", metavar="X.Y", help="peft: the PEFT release that loads the adapter."),
    click.option(
        "--reads-patterns/--no-reads-patterns",
        default=None,
        help="vllm: whether it reads rank/alpha_pattern (0.33 does).",
    ),
)


def server_options(command: Any) -> Any:
    """The options that describe the serving runtime's server, for check --target and convert --for."""
    for option in reversed(SERVER):
        command = option(command)
    return command


def server_values(options: dict[str, Any]) -> dict[str, Any]:
    """The server options given on the command line (the runtime's defaults stand for the others)."""
    names = ("max_lora_rank", "world_size", "peft_version", "reads_patterns")
    return {name: value for name in names if (value := options.pop(name)) is not None}


TO = click.option("--to", type=click.Choice(lorasurgeon.ADAPTER_FORMATS), help="OUT's format (default: the input's).")
RANK = click.option("--rank", type=int, help="Rank of every module (at most its own).")
CPU = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto (the algebra is small).")
ENERGY = click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖².")
