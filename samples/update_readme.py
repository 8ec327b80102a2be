"""Run README.md's examples in order in a clean clone, and regenerate the outputs it shows.

    python samples/update_readme.py          # rewrite README.md in place
    python samples/update_readme.py --check  # exit 1 if README.md is not current (the tests run this)

The clone is a scratch git repository holding this checkout's files (tracked, and untracked ones .gitignore
does not cover) and nothing else; every command runs in it, importing its own lorasurgeon. In README order:

- the `lorasurgeon` commands of the quick start's command block (its `pip install` steps are the environment's
  own; they must exit 0);
- every block to regenerate: a console block under a comment holding its command, whose output is replaced:

      <!-- run: lorasurgeon check samples/base samples/adapter-lora -->
      ```console
      $ lorasurgeon check samples/base samples/adapter-lora
      ...output...
      ```

  and a Python block under `<!-- run: python -->`, whose output replaces the text block after it.

--check also fails when the examples leave anything in the clone that git would call untracked (what they
write must be in .gitignore). Console blocks under `<!-- not run: REASON -->` are shown as they are.
Timings (`1.2 s`) vary from run to run, so --check compares them as `N s`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = r"<!-- run: (?P<cmd>.+?) -->\n```console\n.*?```\n"
PYTHON = r"<!-- run: python -->\n```python\n(?P<code>.*?)```\n```text\n.*?```\n"
BLOCK = re.compile(f"{PYTHON}|{CONSOLE}", re.DOTALL)
QUICK_START = re.compile(r"## Quick start\n.*?```console\n(?P<lines>.*?)```\n", re.DOTALL)
TIMING = re.compile(r"\d+(\.\d+)? s\b")


def environment(clone: Path) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(clone), "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


def run(command: str, clone: Path, stdin: str | None = None) -> tuple[int, str]:
    """(exit code, stdout then stderr with trailing spaces dropped) of a shell command run in the clone."""
    args = ["bash", "-c", command] if stdin is None else [sys.executable, "-"]
    result = subprocess.run(
        args, cwd=clone, env=environment(clone), input=stdin, capture_output=True, text=True, check=False
    )
    output = "\n".join(line.rstrip() for line in (result.stdout + result.stderr).rstrip().splitlines())
    return result.returncode, output


def regenerate(match: re.Match[str], clone: Path) -> str:
    if match.group("code") is not None:
        code, output = run("python -", clone, stdin=match.group("code"))
        status = f"\n(exit code {code})" if code else ""
        return f"<!-- run: python -->\n```python\n{match.group('code')}```\n```text\n{output}{status}\n```\n"
    command = match.group("cmd")
    code, output = run(command, clone)
    status = f"\n(exit code {code})" if code else ""
    return f"<!-- run: {command} -->\n```console\n$ {command}\n{output}{status}\n```\n"


def quick_start(text: str) -> list[str]:
    """The lorasurgeon commands of the quick start's command block, in order."""
    found = QUICK_START.search(text)
    lines = found.group("lines").splitlines() if found else []
    return [part.strip() for line in lines for part in line.split("&&") if part.strip().startswith("lorasurgeon ")]


def make_clone(into: Path) -> Path:
    """A git repository at `into` holding this checkout's files, committed, so `git status` shows what is new."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source, target = ROOT / name, into / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=readme", "-c", "user.email=readme@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=into, check=True)
    subprocess.run([*git, "add", "-A"], cwd=into, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=into, check=True)
    return into


def render(text: str) -> tuple[str, list[str]]:
    """README `text` with every output regenerated, and the problems found on the way (a quick-start command
    that failed, files the examples leave that .gitignore does not cover)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        clone = make_clone(Path(tmp) / "lorasurgeon")
        for command in quick_start(text):
            code, output = run(command, clone)
            if code:
                problems.append(f"quick start `{command}` exited {code}: {output}")
        fresh = BLOCK.sub(lambda m: regenerate(m, clone), text)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone, capture_output=True, text=True
        ).stdout  # fmt: skip
        problems += [f"left behind, not in .gitignore: {line[3:]}" for line in status.splitlines()]
    return fresh, problems


def main() -> int:
    readme = ROOT / "README.md"
    current = readme.read_text()
    fresh, problems = render(current)
    if "--check" in sys.argv:
        if TIMING.sub("N s", fresh) != TIMING.sub("N s", current):
            problems.append("README.md examples are out of date: run python samples/update_readme.py")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    readme.write_text(fresh)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
