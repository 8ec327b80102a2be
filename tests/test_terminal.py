"""What a person sees on a terminal: the progress bar, tables on an 80-column terminal, grouped findings (issue 11).

Rendered with rich's own recording Console (force_terminal), so what is checked is what a terminal gets.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from builders import run_cli
from rich.console import Console

import lorasurgeon
from lorasurgeon import documents, render, tables
from lorasurgeon.errors import Finding
from lorasurgeon.finding_groups import group_findings
from lorasurgeon.progress import Progress
from lorasurgeon.progress_bar import progress_bar

SAMPLES = Path(__file__).parent.parent / "samples"
GB2 = 1_870_827_520  # the checkpoint of the issue: 21 tensors, 1.9 GB


def terminal(width: int = 120) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, record=True, color_system=None)


MERGE = [  # a merge as the library reports it: (seconds since the last report, the report)
    (0.0, Progress(phase="planning")),
    (5.0, Progress(0, 21, 0, GB2, "merging")),
    (0.5, Progress(1, 21, 33_558_528, GB2, "merging")),
    (4.0, Progress(10, 21, 935_413_760, GB2, "merging")),
    (4.0, Progress(21, 21, GB2, GB2, "merging")),
    (0.0, Progress(phase="publishing")),
]


def drawn(reports: list[tuple[float, Progress]]) -> list[str]:
    """What the terminal shows after each report (the text drawn since the one before), on a fake clock."""
    console, now, shown = terminal(), [0.0], []
    with progress_bar("merge", console, clock=lambda: now[0]) as report:
        assert report is not None
        console.export_text(clear=True)
        for seconds, progress in reports:
            now[0] += seconds
            report(progress)
            shown.append(console.export_text(clear=True))
    return shown


def test_progress_shows_the_phase_tensors_and_sizes_and_no_early_estimate() -> None:
    planning, started, first, middle, last, publishing = drawn(MERGE)
    assert "merge: planning" in planning and "tensors" not in planning
    assert "merge: publishing" in publishing
    assert "0/21 tensors, 0.0 B/1.9 GB" in started
    assert "1/21 tensors, 33.6 MB/1.9 GB" in first and "21/21 tensors, 1.9 GB/1.9 GB" in last
    for text in (planning, started, first, middle, last, publishing):
        assert "33558528" not in text and "1870827520" not in text and "?" not in text  # no raw byte counts
    assert "left" not in first  # one tensor after half a second predicts nothing (it said 8 hours)
    assert "about 4 s left" in middle, middle  # 935 MB in 4.5 s: the other 935 MB take as long again
    assert "left" not in last


def test_no_bar_when_piped() -> None:
    piped = Console(file=io.StringIO(), force_terminal=False)
    with progress_bar("merge", piped) as report:
        assert report is None


@pytest.mark.parametrize("phase", ["planning", "publishing"])
def test_uncounted_phases_show_no_counts(phase: str) -> None:
    console = terminal()
    with progress_bar("extract", console) as report:
        assert report is not None
        report(Progress(phase=phase))  # type: ignore[arg-type]
    text = console.export_text()
    assert f"extract: {phase}" in text and "tensors" not in text


def test_the_library_names_each_phase_through_its_callback(tmp_path: Path) -> None:
    seen: list[Progress] = []
    lorasurgeon.merge(SAMPLES / "base", [SAMPLES / "adapter-lora"], tmp_path / "merged", on_progress=seen.append)
    assert list(dict.fromkeys(p.phase for p in seen)) == ["planning", "merging", "publishing"]
    counted = [p for p in seen if p.counted]
    assert (counted[0].tensors_done, counted[-1].tensors_done, counted[-1].tensors_total) == (0, 21, 21)
    assert counted[-1].bytes_done == counted[-1].bytes_total == 213_632  # 106,816 bf16 parameters
    seen.clear()
    lorasurgeon.extract(SAMPLES / "base", tmp_path / "merged", tmp_path / "lora", rank=8, on_progress=seen.append)
    assert list(dict.fromkeys(p.phase for p in seen)) == ["planning", "decomposing", "comparing", "publishing"]
    assert [p.tensors_done for p in seen if p.phase == "decomposing"] == list(range(15))  # 0 before the first SVD


# --- tables at 80 columns: numbers whole, names shortened from the left or wrapped, never cut ---

NUMBER = re.compile(r"[\d,.%x×]*\d[\d,.%x×]*")


def numbers(text: str) -> Counter[str]:
    """The whole-number cells of a rendering (names hold digits too, but always beside letters)."""
    return Counter(t for t in text.split() if NUMBER.fullmatch(t))


def rendered(monkeypatch: pytest.MonkeyPatch, width: int, show: Callable[[], None]) -> str:
    console = terminal(width)
    monkeypatch.setattr(render, "stderr", console)
    show()
    return console.export_text()


@pytest.mark.parametrize("command", ["check", "report", "extract"])
def test_at_80_columns_numbers_are_whole_and_names_keep_what_differs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    base, adapters = SAMPLES / "base", [SAMPLES / "adapter-rslora", SAMPLES / "adapter-lora"]
    if command == "check":
        plan = lorasurgeon.check(base, adapters)
        names = [m["base_key"] for m in documents.plan_doc(plan)["modules"]]
        show: Callable[[], None] = lambda: render.show_check(plan)  # noqa: E731
    elif command == "report":
        result = lorasurgeon.report(adapters[0], base=base)
        names = [m.module.rpartition(".")[2] for m in result.modules]
        show = lambda: render.show_report(result)  # noqa: E731
    else:
        merged = lorasurgeon.merge(base, adapters[:1], tmp_path / "merged")
        summary = lorasurgeon.extract(base, merged.output, rank=4, curve=[2, 4], dry_run=True)
        names = [m.tensor for m in summary.matrices]
        show = lambda: render.show_extract(summary)  # noqa: E731
    wide, narrow = rendered(monkeypatch, 200, show), rendered(monkeypatch, 80, show)
    assert "…" not in wide
    assert numbers(narrow) == numbers(wide) and sum(numbers(wide).values()) > 40
    assert not re.search(r"[\d,.]…", narrow)  # `16,3…` on main
    for name in names:  # what differs from row to row: the layer and module (`.weight` may wrap to the next line)
        assert name.removeprefix("model.layers.").removesuffix(".weight") in narrow, name


def test_a_narrow_terminal_wraps_long_names_after_their_dots(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = lorasurgeon.check(SAMPLES / "base", [SAMPLES / "adapter-rslora", SAMPLES / "adapter-lora"])
    narrow = rendered(monkeypatch, 60, lambda: render.show_check(plan))
    assert "…0.mlp." in narrow and numbers(narrow)["64x128"] == 4


@pytest.mark.parametrize(
    ("name", "width", "lines"),
    [
        ("model.layers.0.mlp.up_proj.weight", 40, ["model.layers.0.mlp.up_proj.weight"]),
        ("model.layers.0.mlp.up_proj.weight", 30, ["…layers.0.mlp.up_proj.weight"]),
        ("model.layers.0.mlp.up_proj.weight", 25, ["…0.mlp.up_proj.weight"]),
        ("model.layers.0.mlp.up_proj.weight", 12, ["…0.mlp.", "up_proj.", "weight"]),
        ("model.layers.0.mlp.up_proj.weight", 5, ["…0.", "mlp.", "up_pr", "oj.", "weigh", "t"]),
        ("lm_head.weight", 8, ["lm_head.", "weight"]),
    ],
)
def test_wrap(name: str, width: int, lines: list[str]) -> None:
    shared = len("model.layers.") if name.startswith("model.layers.") else 0
    assert tables.wrap(name, shared, width) == lines


def test_shared_prefix_ends_at_a_separator() -> None:
    assert tables.shared_prefix(["model.layers.0.q", "model.layers.1.q", "model.layers.10.q"]) == len("model.layers.")
    assert tables.shared_prefix(["samples/adapter-lora", "samples/adapter-rslora"]) == len("samples/")
    assert tables.shared_prefix(["model.norm.weight"]) == 0


# --- findings of one kind, grouped ---


def test_an_adapter_for_another_model_size_is_a_few_lines(capsys: pytest.CaptureFixture[str], llama_dir: Path) -> None:
    """samples/adapter-lora was trained on hidden size 64; llama_dir has 32: all 14 modules fail alike."""
    code, out, err = run_cli(["check", str(llama_dir), str(SAMPLES / "adapter-lora")], capsys)
    assert code == 1 and out == ""
    assert len(err.splitlines()) <= 3 and len(err) < 600, err
    first = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight -> model.layers.0.mlp.down_proj.weight"
    assert f"error (14 like this): {first}: B @ A is 64x128" in err
    assert "14 problems; --json lists each" in err
    code, out, _ = run_cli(["check", str(llama_dir), str(SAMPLES / "adapter-lora"), "--json"], capsys)
    assert code == 1 and len(json.loads(out)["findings"]) == 14  # --json keeps every finding


def test_group_findings_keeps_order_and_leaves_pairs_alone() -> None:
    def shape(i: int) -> Finding:
        return Finding.against(f"a.{i}.lora_A", f"w.{i}", f"B @ A is {i}x{2 * i}, which does not fit")

    missing = [Finding.against(f"a.{i}.lora_A", None, f"target w.{i} is not in the base") for i in (7, 8)]
    other = Finding.of("warning", "x.safetensors: key y is ignored")
    findings = [shape(1), missing[0], shape(2), other, shape(3), missing[1]]
    groups = group_findings(findings)
    assert [(g.first, g.count) for g in groups] == [(shape(1), 3), (missing[0], 1), (other, 1), (missing[1], 1)]
