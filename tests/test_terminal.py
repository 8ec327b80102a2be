"""What a person sees on a terminal: the progress bar, tables on an 80-column terminal, grouped findings (issue 11).

Rendered with rich's own recording Console (force_terminal), so what is checked is what a terminal gets.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import lorasurgeon
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
