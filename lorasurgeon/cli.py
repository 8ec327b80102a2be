"""The command line: each command parses options, calls one library function and hands the result to render.

Errors become exit codes in exactly one place, `main`.
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import click

import lorasurgeon
from lorasurgeon import render
from lorasurgeon.errors import LorasurgeonError

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
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
OUT = click.option("-o", "--out", type=click.Path(path_type=Path), help="Output path (default: <base>-merged).")
EXISTING = click.Path(exists=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorasurgeon")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """LoRA surgery on safetensors checkpoints: check, merge, unmerge."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("base", type=EXISTING)
@click.argument("adapters", nargs=-1, required=True, type=EXISTING)
@ALPHA
@JSON
def check(base: Path, adapters: tuple[Path, ...], alpha: float | None, as_json: bool) -> None:
    """Check that ADAPTERS fit BASE. Exit 0 if they fit, 1 if not, 2 if an input is unreadable.

    Example: lorasurgeon check base/ adapter/
    """
    plan = lorasurgeon.check(base, adapters, alpha=alpha)
    render.emit_json(render.plan_doc(plan)) if as_json else render.show_check(plan)
    sys.exit(1 if plan.errors else 0)


@cli.command()
@click.argument("base", type=EXISTING)
@click.argument("adapters", nargs=-1, required=True, type=EXISTING)
@OUT
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, once per adapter.")
@SCALE
@ALPHA
@DEVICE
@DTYPE
@FORCE
@DRY_RUN
@JSON
def merge(base: Path, adapters: tuple[Path, ...], out: Path | None, weights: tuple[float, ...], **options: Any) -> None:
    """Merge one or more ADAPTERS into BASE and write OUT.

    Example: lorasurgeon merge base/ adapter/ -o merged/
    """
    as_json = options.pop("as_json")
    with render.progress_bar("merge") as on_progress:
        summary = lorasurgeon.merge(base, adapters, out, weights=weights, on_progress=on_progress, **options)
    render.emit_json(render.summary_doc(summary)) if as_json else render.show_summary(summary)


@cli.command()
@click.argument("merged", type=EXISTING)
@click.argument("adapter", type=EXISTING)
@OUT
@SCALE
@ALPHA
@DEVICE
@DTYPE
@FORCE
@DRY_RUN
@JSON
def unmerge(merged: Path, adapter: Path, out: Path | None, **options: Any) -> None:
    """Subtract ADAPTER from MERGED and write OUT (restores the base up to rounding).

    Example: lorasurgeon unmerge merged/ adapter/ -o base-again/
    """
    as_json = options.pop("as_json")
    with render.progress_bar("unmerge") as on_progress:
        summary = lorasurgeon.unmerge(merged, adapter, out, on_progress=on_progress, **options)
    render.emit_json(render.summary_doc(summary)) if as_json else render.show_summary(summary)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the writer removes its temporary on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI; every LorasurgeonError becomes one `Error:` line and its exit code."""
    signal.signal(signal.SIGTERM, _terminate)
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="lorasurgeon", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(_fail("interrupted; nothing was written", 130))
    except KeyboardInterrupt:
        sys.exit(_fail("interrupted; nothing was written", 130))
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except LorasurgeonError as e:
        if debug:
            traceback.print_exc()
        sys.exit(_fail(str(e), e.exit_code))


def _fail(message: str, code: int) -> int:
    click.echo(f"Error: {message}", err=True)
    return code
