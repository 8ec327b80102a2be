"""The commands that write an adapter: extract (from a full fine-tune), convert (to another format or runtime),
resize and combine (adapter algebra). Each parses options, calls one library function and hands the result to
render; cli.py adds them to the `lorasurgeon` group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

import lorasurgeon
from lorasurgeon import adapter_documents, documents, render
from lorasurgeon.cli_options import (
    ALPHA,
    BASE_NAME,
    CPU,
    DEVICE,
    DRY_RUN,
    ENERGY,
    EXISTING,
    FORCE,
    JSON,
    PATTERNS,
    RANK,
    TO,
    server_options,
    server_values,
)


def _ranks(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """`2,4,8,16` -> (2, 4, 8, 16)."""
    try:
        return tuple(int(part) for part in value.split(",")) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated ranks such as 2,4,8,16") from None


@click.command()
@click.argument("base", type=EXISTING)
@click.argument("tuned", type=EXISTING)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Adapter directory (default: <tuned>-lora).")
@click.option("--rank", type=int, help="Rank of every matrix.")
@click.option("--energy", type=float, help="Per matrix, the smallest rank keeping this fraction of ‖ΔW‖² (0-1].")
@click.option("--max-rank", type=int, help="Cap on the rank --energy chooses.")
@click.option("--alpha", type=float, help="lora_alpha (default: alpha = r, so the scale is 1).")
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="PATTERN",
    help="Modules to extract, repeatable: a shell glob on the module path ('*.self_attn.*'), or re:REGEX "
    "(a full match, 're:.*\\.(q|v)_proj'). Default: every 2-D weight but embeddings and output heads.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "exact", "randomized"]),
    default="auto",
    show_default=True,
    help="exact: full SVD (the optimum); randomized: range finder + power iterations, checked for convergence; "
    "auto: the cheaper one, randomized once the smaller side is 5x the sketch (exact for unbounded ranks).",
)
@DEVICE
@click.option("--skip-mismatched", is_flag=True, help="Skip tensors on one side only or of different shapes.")
@click.option("--include-embeddings", is_flag=True, help="Also extract embeddings (PEFT lora_embedding_A/B).")
@click.option(
    "--save-changed-vectors",
    is_flag=True,
    help="Store modules whose 1-D tensors changed (norms) in full, as PEFT modules_to_save.",
)
@BASE_NAME
@click.option("--curve", callback=_ranks, metavar="R1,R2,...", help="Also report the relative error at these ranks.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw spectra and error-vs-rank to a PNG (matplotlib).")
@click.option("--patterns", is_flag=True, help=PATTERNS)
@click.option(
    "--cluster",
    metavar="ray[:ADDRESS]",
    help="Run one Ray task per matrix (pip install 'lorasurgeon[ray]'); BASE and TUNED must be on storage every "
    "node sees at the same path. ADDRESS as ray.init takes it (host:port, auto); default: Ray's own.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch threads per matrix (default: all of this machine's). Factors are bit-identical for the same "
    "threads and device type, locally or on any worker.",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted extract from the matrices it computed.")
@FORCE
@click.option("--dry-run", is_flag=True, help="Compute and report; write no adapter.")
@JSON
def extract(base: Path, tuned: Path, out: Path | None, plot: Path | None, **options: Any) -> None:
    """Extract a LoRA adapter from a full fine-tune: truncated SVD of TUNED − BASE, per matrix.

    Example: lorasurgeon extract base/ tuned/ -o lora/ --energy 0.9 --max-rank 64
    """
    as_json = options.pop("as_json")
    if plot is not None:
        render.require_matplotlib()
    with render.progress_bar("extract") as on_progress:
        summary = lorasurgeon.extract(base, tuned, out, on_progress=on_progress, **options)
    if plot is not None:
        render.plot_extract(summary, plot)
    documents.emit_json(adapter_documents.extract_doc(summary)) if as_json else render.show_extract(summary)


@click.command()
@click.argument("adapter", type=EXISTING)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    help="PEFT: a directory; else a .safetensors file (default: <adapter>-<to>).",
)
@click.option(
    "--to",
    "to",
    type=click.Choice(lorasurgeon.ADAPTER_FORMATS),
    help="The format to write (default: what --for reads).",
)
@click.option(
    "--for",
    "runtime",
    type=click.Choice(lorasurgeon.RUNTIMES),
    help="Lower the adapter so that this serving runtime reads it as PEFT does (pad ranks, token rows as LoRA rows, "
    "missing layers filled), or refuse naming what cannot be lowered exactly.",
)
@click.option(
    "--base",
    type=EXISTING,
    help="Checkpoint whose tensor names resolve kohya names (needed from kohya); it can also name kohya modules.",
)
@click.option(
    "--component",
    type=click.Choice(list(lorasurgeon.COMPONENTS)),
    help="The pipeline component (or kohya prefix) of a PEFT adapter (default: the layout of --base, a diffusers "
    "unet/ directory, say); for kohya and diffusers files, convert only it.",
)
@ALPHA
@BASE_NAME
@click.option("--patterns", is_flag=True, help=PATTERNS + " A and B are then copied byte for byte.")
@server_options
@FORCE
@DRY_RUN
@JSON
def convert(adapter: Path, out: Path | None, **options: Any) -> None:
    """Rewrite ADAPTER as a PEFT, kohya or diffusers LoRA with the same ΔW, or lower it --for a serving runtime.

    Example: lorasurgeon convert adapter/ --to kohya --component lora_unet -o lora.safetensors
    """
    as_json, server = options.pop("as_json"), server_values(options)
    if options["to"] is None and options["runtime"] is None:
        raise click.UsageError("give --to FORMAT or --for RUNTIME")
    summary = lorasurgeon.convert(adapter, out, server=server, **options)
    documents.emit_json(adapter_documents.convert_doc(summary)) if as_json else render.show_convert(summary)


_CLUSTER = click.option(
    "--cluster",
    metavar="ray[:ADDRESS]",
    help="Run one Ray task per module (pip install 'lorasurgeon[ray]'); the adapters must be on storage every node "
    "sees at the same path. ADDRESS as ray.init takes it (host:port, auto); default: Ray's own.",
)
_THREADS = click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch threads per module (default: all of this machine's); factors are bit-identical for the same threads "
    "and device type, locally or on any worker.",
)
_RESUME = click.option("--resume", is_flag=True, help="Continue an interrupted run from the modules it computed.")


def _per_module(command: Any) -> Any:
    """--cluster, --threads and --resume, as resize and combine take them."""
    return _CLUSTER(_THREADS(_RESUME(command)))


@click.command()
@click.argument("adapter", type=EXISTING)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output (default: <adapter>-resized).")
@RANK
@ENERGY
@click.option("--ratio", type=float, help="Per module, keep σ_k with σ_k/σ₁ ≥ 1/X (kohya's sv_ratio).")
@click.option("--fro", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F.")
@click.option("--params", type=int, help="One budget of N parameters, ranks chosen together for the least error.")
@TO
@CPU
@_per_module
@FORCE
@JSON
def resize(adapter: Path, out: Path | None, **options: Any) -> None:
    """Cut ADAPTER's ranks: per module the best factors of its own ΔW, exactly, never forming the dense ΔW.

    Example: lorasurgeon resize adapter/ --rank 16 -o adapter-r16/
    """
    as_json = options.pop("as_json")
    summary = lorasurgeon.resize(adapter, out, **options)
    documents.emit_json(adapter_documents.algebra_doc(summary)) if as_json else render.show_algebra(summary)


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=EXISTING)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The combined adapter.")
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, once per adapter.")
@click.option("--weights", "weights_file", type=EXISTING, help="JSON or CSV of adapter path -> weight.")
@click.option("--mean", is_flag=True, help="Divide the weights by their sum (FedAvg).")
@click.option("--method", type=click.Choice(lorasurgeon.METHODS), help="Default: cat, or svd with --rank/--energy.")
@RANK
@ENERGY
@click.option("--density", type=float, help="Fraction of entries ties/dare/magnitude_prune keep.")
@click.option("--seed", type=int, default=0, show_default=True, help="DARE's seed.")
@click.option("--report-naive", is_flag=True, help="Also show how far FedIT's A/B averaging is from the exact sum.")
@TO
@CPU
@_per_module
@FORCE
@JSON
def combine(adapters: tuple[Path, ...], out: Path, **options: Any) -> None:
    """Write the weighted sum of ADAPTERS' ΔW as one adapter: exact (cat), re-compressed (svd), or TIES/DARE.

    Example: lorasurgeon combine clients/*/ --weights counts.json --mean --rank 16 -o global/
    """
    as_json = options.pop("as_json")
    summary = lorasurgeon.combine(adapters, out, **options)
    documents.emit_json(adapter_documents.algebra_doc(summary)) if as_json else render.show_algebra(summary)
