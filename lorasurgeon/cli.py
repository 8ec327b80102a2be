"""The command line: each command parses options, calls one library function and hands the result to render.

Errors become exit codes in exactly one place, `main`.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import click

import lorasurgeon
from lorasurgeon import documents, interrupts, render, report_views, views
from lorasurgeon.cli_adapter_commands import combine, convert, extract, resize
from lorasurgeon.cli_options import (
    ALLOW_NONFINITE,
    ALPHA,
    DEVICE,
    DRY_RUN,
    DTYPE,
    EXISTING,
    FORCE,
    JSON,
    OUT,
    SCALE,
    output_option,
    server_options,
    server_values,
)
from lorasurgeon.errors import LorasurgeonError, NonfiniteWarning
from lorasurgeon.hub import DOWNLOAD_ENV


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorasurgeon")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.option(
    "--download",
    is_flag=True,
    help="Download a Hub repo id (org/name[@revision]) not in the local cache (as LORASURGEON_DOWNLOAD=1).",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, download: bool) -> None:
    """LoRA surgery on safetensors checkpoints: check, merge, unmerge, verify, extract, report, convert, resize,
    combine. Every input may be a path or a Hub repo id in the local Hugging Face cache."""
    ctx.obj = {"debug": debug}
    if download:  # the library reads the permission from the environment, for every input of the command
        os.environ[DOWNLOAD_ENV] = "1"


@cli.command()
@click.argument("base", type=EXISTING)
@click.argument("adapters", nargs=-1, required=True, type=EXISTING)
@ALPHA
@click.option(
    "--target",
    type=click.Choice(lorasurgeon.RUNTIMES),
    help="Also check that this serving runtime reads each adapter as PEFT does (each rule names its source).",
)
@server_options
@JSON
def check(base: Path, adapters: tuple[Path, ...], alpha: float | None, target: str | None, **options: Any) -> None:
    """Check that ADAPTERS fit BASE (and, with --target, run on that runtime). Exit 0 if they fit, 1 if not, 2 if
    an input is unreadable.

    Example: lorasurgeon check base/ adapter/ --target vllm --max-lora-rank 32
    """
    as_json = options.pop("as_json")
    plan = lorasurgeon.check(base, adapters, alpha=alpha, target=target, server=server_values(options))
    documents.emit_json(documents.plan_doc(plan)) if as_json else render.show_check(plan, target)
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
@ALLOW_NONFINITE
@JSON
def merge(base: Path, adapters: tuple[Path, ...], out: Path | None, weights: tuple[float, ...], **options: Any) -> None:
    """Merge one or more ADAPTERS into BASE and write OUT.

    Example: lorasurgeon merge base/ adapter/ -o merged/
    """
    as_json = options.pop("as_json")
    with render.progress_bar("merge") as on_progress:
        summary = lorasurgeon.merge(base, adapters, out, weights=weights, on_progress=on_progress, **options)
    documents.emit_json(documents.summary_doc(summary)) if as_json else render.show_summary(summary)


@cli.command()
@click.argument("merged", type=EXISTING)
@click.argument("adapter", type=EXISTING)
@output_option("<merged>-unmerged")
@SCALE
@ALPHA
@DEVICE
@DTYPE
@FORCE
@DRY_RUN
@ALLOW_NONFINITE
@JSON
def unmerge(merged: Path, adapter: Path, out: Path | None, **options: Any) -> None:
    """Subtract ADAPTER from MERGED and write OUT (restores the base up to rounding).

    Example: lorasurgeon unmerge merged/ adapter/ -o base-again/
    """
    as_json = options.pop("as_json")
    with render.progress_bar("unmerge") as on_progress:
        summary = lorasurgeon.unmerge(merged, adapter, out, on_progress=on_progress, **options)
    documents.emit_json(documents.summary_doc(summary)) if as_json else render.show_summary(summary)


@cli.command()
@click.argument("merged", type=EXISTING)
@click.option("--base", type=EXISTING, required=True, help="The checkpoint MERGED was merged from.")
@click.argument("adapters", nargs=-1, required=True, type=EXISTING)
@click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter, once per adapter.")
@ALPHA
@click.option(
    "--tolerance",
    type=int,
    default=1,
    show_default=True,
    help="ulps of each tensor's dtype MERGED may be from round(BASE + ΔW) (PEFT's own bf16 merge is within 1).",
)
@click.option(
    "--cluster",
    metavar="ray[:ADDRESS]",
    help="Verify one tensor per Ray task (pip install 'lorasurgeon[ray]'); MERGED, BASE and the adapters must be on "
    "storage every node sees at the same path. ADDRESS as ray.init takes it (host:port, auto); default: Ray's own.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted verify from the verdicts it kept (a hidden .lorasurgeon-verify-* folder beside "
    "MERGED, removed when the run completes).",
)
@JSON
@click.option("--markdown", is_flag=True, help="Print Markdown on stdout (for a CI job summary).")
def verify(merged: Path, base: Path, adapters: tuple[Path, ...], as_json: bool, markdown: bool, **options: Any) -> None:
    """Prove that MERGED is BASE + ADAPTERS, tensor by tensor, and that its config and tokenizer agree. Exit 0
    when everything is proven, 1 with the list of problems, 2 if an input is unreadable.

    Example: lorasurgeon verify merged/ --base base/ adapter/
    """
    if as_json and markdown:
        raise click.UsageError("--json and --markdown are exclusive; choose one")
    with render.progress_bar("verify") as on_progress:
        summary = lorasurgeon.verify(merged, base, adapters, on_progress=on_progress, **options)
    if as_json:
        documents.emit_json(documents.verify_doc(summary))
    elif markdown:
        sys.stdout.write(views.verify_markdown(summary))
    else:
        render.show_verify(summary)
    sys.exit(0 if summary.ok else 1)


@cli.command()
@click.argument("path", type=EXISTING)
@click.option("--base", type=EXISTING, help="For an adapter: also check it against this checkpoint.")
@click.option("--stats", is_flag=True, help="Read every tensor once: NaN/Inf, min/max/mean/std, ΔW norms.")
@JSON
@click.option("--markdown", is_flag=True, help="Print Markdown on stdout (for a CI job summary).")
@click.option(
    "--fail-on", "fail_on", multiple=True, metavar="RULE", help=f"Exit 1 if RULE holds: {lorasurgeon.RULE_HELP}."
)
def report(path: Path, base: Path | None, stats: bool, as_json: bool, markdown: bool, fail_on: tuple[str, ...]) -> None:
    """Describe the checkpoint or adapter at PATH from its headers. Exit 1 if a --fail-on rule holds.

    Example: lorasurgeon report adapter/ --base base/ --fail-on 'rank>64' --fail-on 'params>50M'
    """
    if as_json and markdown:
        raise click.UsageError("--json and --markdown are exclusive; choose one")
    with render.progress_bar("report") as on_progress:
        result = lorasurgeon.report(path, base=base, stats=stats, fail_on=fail_on, on_progress=on_progress)
    if as_json:
        documents.emit_json(documents.report_doc(result))
    elif markdown:
        sys.stdout.write(report_views.report_markdown(result))
    else:
        render.show_report(result)
    if as_json or markdown:
        render.show_fired(result)
    sys.exit(1 if result.fired else 0)


for command in (extract, convert, resize, combine):  # the commands that write an adapter (cli_adapter_commands)
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure becomes one `Error:` line on stderr and exit code 2 (130 when interrupted,
    at any moment: see interrupts); `--debug`, before or after the command's name, adds the traceback.
    NonfiniteWarnings become `warning:` lines."""
    args = hoist_group_flags(list(sys.argv[1:] if argv is None else argv))
    since = len(interrupts.committed)
    # Off for the command: the cycle collector would mostly walk the objects torch's import creates (0.4 s of
    # its 2-3 s of CPU); a command makes few cycles, and they are freed when it ends (or the process exits).
    collecting = gc.isenabled()
    gc.disable()
    # Ctrl-C, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so the writer removes its temporary on the way out.
    handlers = {signum: signal.signal(signum, interrupts.unwind) for signum in interrupts.SIGNALS}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", NonfiniteWarning)
            warnings.showwarning = _show_warning
            cli.main(args=args, prog_name="lorasurgeon", standalone_mode=False)
    except click.ClickException as e:
        interrupts.ignore()  # the answer is being given: a late Ctrl-C must not add a second one
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(_fail(interrupts.message(since), interrupts.EXIT_CODE))
    except Exception as e:  # the one funnel: ours carry a sentence, the OS's name a file, the rest are bugs
        interrupts.ignore()
        if "--debug" in args:
            traceback.print_exc()
        sys.exit(_fail(*_describe(e)))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, interrupts.after_command(handler))
        if collecting:
            gc.enable()


GROUP_FLAGS = ("--debug", "--download")


def hoist_group_flags(args: list[str]) -> list[str]:
    """`--debug` and `--download` are the group's options; accept them after the command's name too (`merge
    --debug ...`, `report org/name --download`) by moving them to the front. An argument after `--` is a name,
    and stays where it is."""
    end = args.index("--") if "--" in args else len(args)
    flags = [flag for flag in GROUP_FLAGS if flag in args[:end]]
    if not flags:
        return args
    return [*flags, *(a for a in args[:end] if a not in GROUP_FLAGS), *args[end:]]


def _describe(error: Exception) -> tuple[str, int]:
    """The message and exit code for an exception that reached `main`."""
    if isinstance(error, LorasurgeonError):
        return error.words("cli"), error.exit_code
    if isinstance(error, OSError):
        return f"{error.filename or 'lorasurgeon'}: {error.strerror or error}", 2
    bug = f"{type(error).__name__}: {error}"
    return f"internal error ({bug}); this is a bug in lorasurgeon: rerun with --debug and report it", 2


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    text = message.words("cli") if isinstance(message, NonfiniteWarning) else message
    click.echo(f"warning: {text}", err=True)


def _fail(message: str, code: int) -> int:
    interrupts.ignore()  # one answer: a Ctrl-C from here on must not print a second
    click.echo(f"Error: {' '.join(str(message).split())}", err=True)  # always one line
    return code
