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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

import lorasurgeon
from lorasurgeon import documents, interrupts, render, views
from lorasurgeon.errors import LorasurgeonError, NonfiniteWarning
from lorasurgeon.hub import DOWNLOAD_ENV

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


def _server(options: dict[str, Any]) -> dict[str, Any]:
    """The server options given on the command line (the runtime's defaults stand for the others)."""
    names = ("max_lora_rank", "world_size", "peft_version", "reads_patterns")
    return {name: value for name in names if (value := options.pop(name)) is not None}


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
    plan = lorasurgeon.check(base, adapters, alpha=alpha, target=target, server=_server(options))
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
        sys.stdout.write(render.report_markdown(result))
    else:
        render.show_report(result)
    if as_json or markdown:
        render.show_fired(result)
    sys.exit(1 if result.fired else 0)


def _ranks(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """`2,4,8,16` -> (2, 4, 8, 16)."""
    try:
        return tuple(int(part) for part in value.split(",")) if value else ()
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated ranks such as 2,4,8,16") from None


@cli.command()
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
    documents.emit_json(documents.extract_doc(summary)) if as_json else render.show_extract(summary)


@cli.command()
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
    as_json, server = options.pop("as_json"), _server(options)
    if options["to"] is None and options["runtime"] is None:
        raise click.UsageError("give --to FORMAT or --for RUNTIME")
    summary = lorasurgeon.convert(adapter, out, server=server, **options)
    documents.emit_json(documents.convert_doc(summary)) if as_json else render.show_convert(summary)


TO = click.option("--to", type=click.Choice(lorasurgeon.ADAPTER_FORMATS), help="OUT's format (default: the input's).")
RANK = click.option("--rank", type=int, help="Rank of every module (at most its own).")
CPU = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto (the algebra is small).")
ENERGY = click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖².")


@cli.command()
@click.argument("adapter", type=EXISTING)
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output (default: <adapter>-resized).")
@RANK
@ENERGY
@click.option("--ratio", type=float, help="Per module, keep σ_k with σ_k/σ₁ ≥ 1/X (kohya's sv_ratio).")
@click.option("--fro", type=float, help="Per module, the smallest rank keeping this fraction of ‖ΔW‖_F.")
@click.option("--params", type=int, help="One budget of N parameters, ranks chosen together for the least error.")
@TO
@CPU
@FORCE
@JSON
def resize(adapter: Path, out: Path | None, **options: Any) -> None:
    """Cut ADAPTER's ranks: per module the best factors of its own ΔW, exactly, never forming the dense ΔW.

    Example: lorasurgeon resize adapter/ --rank 16 -o adapter-r16/
    """
    as_json = options.pop("as_json")
    summary = lorasurgeon.resize(adapter, out, **options)
    documents.emit_json(documents.algebra_doc(summary)) if as_json else render.show_algebra(summary)


@cli.command()
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
@FORCE
@JSON
def combine(adapters: tuple[Path, ...], out: Path, **options: Any) -> None:
    """Write the weighted sum of ADAPTERS' ΔW as one adapter: exact (cat), re-compressed (svd), or TIES/DARE.

    Example: lorasurgeon combine clients/*/ --weights counts.json --mean --rank 16 -o global/
    """
    as_json = options.pop("as_json")
    summary = lorasurgeon.combine(adapters, out, **options)
    documents.emit_json(documents.algebra_doc(summary)) if as_json else render.show_algebra(summary)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every failure becomes one `Error:` line on stderr and exit code 2 (130 when interrupted,
    at any moment: see interrupts); `--debug`, before or after the command's name, adds the traceback.
    NonfiniteWarnings become `warning:` lines."""
    args = hoist_debug(list(sys.argv[1:] if argv is None else argv))
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


def hoist_debug(args: list[str]) -> list[str]:
    """`--debug` is the group's option; accept it after the command's name too (`merge --debug ...`) by
    moving it to the front. An argument after `--` is a name, and stays where it is."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]


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
