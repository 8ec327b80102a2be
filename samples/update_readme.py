"""Regenerate the example outputs in README.md by running the commands it shows on the shipped samples.

    python samples/update_readme.py          # rewrite README.md in place
    python samples/update_readme.py --check  # exit 1 if README.md is not current (the tests run this)

A block to regenerate looks like this in README.md (the comment holds the command, run from a scratch
directory where `samples/` points at this folder; the console block below it is replaced):

    <!-- run: lorasurgeon check samples/base samples/adapter-lora -->
    ```console
    $ lorasurgeon check samples/base samples/adapter-lora
    ...output...
    ```

Timings (`1.2 s`) vary from run to run, so --check compares them as `N s`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- run: (?P<cmd>.+?) -->\n```console\n.*?```\n", re.DOTALL)
TIMING = re.compile(r"\d+(\.\d+)? s\b")


def run(command: str, scratch: Path) -> str:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    # A shell, so that an example may pipe (`... --json | head`); stderr is shown after stdout.
    result = subprocess.run(["bash", "-c", command], cwd=scratch, env=env, capture_output=True, text=True, check=False)
    output = "\n".join(line.rstrip() for line in (result.stdout + result.stderr).rstrip().splitlines())
    status = f"\n(exit code {result.returncode})" if result.returncode else ""
    return f"<!-- run: {command} -->\n```console\n$ {command}\n{output}{status}\n```\n"


def render(text: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "samples").symlink_to(ROOT / "samples")
        return BLOCK.sub(lambda m: run(m.group("cmd"), scratch), text)


def main() -> int:
    readme = ROOT / "README.md"
    current = readme.read_text()
    fresh = render(current)
    if "--check" in sys.argv:
        if TIMING.sub("N s", fresh) != TIMING.sub("N s", current):
            print("README.md examples are out of date: run python samples/update_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
