"""README.md against the code: its exit-code table, its shell-completion line, and that it names nothing that is
not in the repository. (That its examples run in order from a clean clone, print what it shows and leave only
what .gitignore lists is samples/update_readme.py --check, run by tests/test_cli.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from builders import run_cli

import lorasurgeon

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
SAMPLES = ROOT / "samples"


def exit_code_table() -> dict[int, str]:
    """code -> the commands column of the README's exit-code table."""
    section = README.split("## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {int(code): commands for code, commands in re.findall(r"^\| (\d+) \| .*? \| ([^|]+) \|$", section, re.M)}


def interrupted(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


# (command line, the exit code the table promises, what to patch in as the library function or None)
CASES = [
    (["check", SAMPLES / "base", SAMPLES / "adapter-lora"], 0, None),
    (["report", SAMPLES / "adapter-lora", "--fail-on", "rank>8"], 0, None),
    (["check", "LLAMA", SAMPLES / "adapter-lora"], 1, None),  # an adapter for another model size
    (["report", SAMPLES / "adapter-lora", "--fail-on", "rank>4"], 1, None),
    (["verify", SAMPLES / "base", "--base", SAMPLES / "base", SAMPLES / "adapter-lora"], 1, None),  # not merged
    (["merge", SAMPLES / "base", "no-such-adapter"], 2, None),
    (["merge", SAMPLES / "base", SAMPLES / "adapter-lora", "--no-such-option"], 2, None),
    (["extract", SAMPLES / "base", SAMPLES / "base", "--rank", "2"], 2, None),  # nothing to extract
    (["extract", SAMPLES / "base", SAMPLES / "base", "--rank", "0"], 2, None),
    (["report", SAMPLES / "base", "--fail-on", "no-such-rule"], 2, None),
    (["check", SAMPLES / "base", SAMPLES / "adapter-lora"], 130, interrupted),
]


@pytest.mark.parametrize(("args", "code", "patch"), CASES)
def test_exit_codes_are_the_tables(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    llama_dir: Path,
    args: list[object],
    code: int,
    patch: object,
) -> None:
    table = exit_code_table()
    assert set(table) == {case[1] for case in CASES} == {0, 1, 2, 130}
    if patch is not None:
        monkeypatch.setattr(lorasurgeon, str(args[0]), patch)
    got, _, err = run_cli([str(llama_dir) if a == "LLAMA" else str(a) for a in args], capsys)
    assert got == code, err
    assert table[code] == "all" or f"`{args[0]}`" in table[code]
    assert ("Error:" in err) == (code in (2, 130)) and "Traceback" not in err


def test_exit_one_is_only_ever_a_verdict() -> None:
    """Only check, verify and report (a --fail-on rule) give 1; every other failure is an error (2), extract's
    too."""
    assert exit_code_table()[1] == "`check`, `verify`, `report`"
    assert lorasurgeon.errors.NothingChangedError("x").exit_code == 2


def test_the_shell_completion_line_completes(tmp_path: Path) -> None:
    """The bash line of the README, sourced in a real bash, completes `lorasurgeon me` to `merge`."""
    line = next(x for x in README.splitlines() if "bash_source" in x).split("#")[0].strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lorasurgeon").write_text(f'#!/bin/sh\nexec {sys.executable} -m lorasurgeon "$@"\n')
    (bin_dir / "lorasurgeon").chmod(0o755)
    # bash calls the completion function with the command's name first, as `complete -F` does
    complete = '_lorasurgeon_completion lorasurgeon; echo "${COMPREPLY[@]}"'
    script = f"{line}\nCOMP_WORDS=(lorasurgeon me); COMP_CWORD=1; {complete}"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.split() == ["merge"], result.stderr


def test_names_no_document_outside_the_repository() -> None:
    links = [link for link in re.findall(r"\]\(([^)#]+)", README) if "://" not in link]
    documents = re.findall(r"(?<![\w/.:-])([\w/.-]+\.md)\b", README)
    # A command's output may cite an upstream source file (check --target's rules cite vLLM's); the prose may not
    # name a file of its own that is not here.
    outputs = [m.group(0) for m in re.finditer(r"```console\n.*?```", README, flags=re.S)]
    prose = README
    for block in outputs:  # keep the commands ($ lines) of a console block that shows output, drop the output
        if re.search(r"^\$ ", block, re.M):
            prose = prose.replace(block, "\n".join(line for line in block.splitlines() if line.startswith("$ ")))
    paths = re.findall(r"(?<![\w/.:-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|json|toml))", prose)
    named = {*links, *documents, *paths}
    assert {"ARCHITECTURE.md", "bench/RESULTS.md", "samples/update_readme.py"} <= named
    assert sorted(n for n in named if not (ROOT / n).exists()) == []


def test_every_console_example_that_shows_output_is_run_or_says_why_not() -> None:
    """An example with output (`$ ` lines) is regenerated by samples/update_readme.py, or marked `not run`."""
    shown, unmarked = 0, []
    for block in re.finditer(r"```console\n(?P<body>.*?)```", README, re.S):
        if not re.search(r"^\$ ", block.group("body"), re.M):
            continue  # commands to type, no output shown
        shown += 1
        before = README[: block.start()].rstrip("\n").rsplit("\n\n", 1)[-1]
        if not re.search(r"<!-- (run|not run):", before):
            unmarked.append(block.group("body").splitlines()[0])
    assert shown > 5 and unmarked == []
