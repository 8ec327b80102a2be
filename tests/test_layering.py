"""The architecture rule of DESIGN.md: each module imports only modules listed before it; linalg imports only
torch; only render and cli import rich or click; nothing below cli prints."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "lorasurgeon"
ORDER = [
    "errors",
    "adapter_facts",
    "runtime_checks",
    "runtime_rules",
    "runtimes",
    "header",
    "sd_names",
    "keys",
    "lora_config",
    "linalg",
    "lowering",
    "verdict",
    "lycoris",
    "checkpoint",
    "writer",
    "adapter",
    "plan",
    "scales",
    "renaming",
    "conversion",
    "surgery",
    "extraction",
    "report",
    "__init__",
    "render",
    "cli",
    "__main__",
]
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "lorasurgeon":
            # `from lorasurgeon import keys` imports a module; `from lorasurgeon import merge` the package API.
            names |= {f"lorasurgeon.{a.name}" if a.name in ORDER else "lorasurgeon" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_every_module_is_in_the_order() -> None:
    assert set(MODULES) <= set(ORDER), set(MODULES) - set(ORDER)


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_modules_above(module: str) -> None:
    ours = {
        "__init__" if n == "lorasurgeon" else n.removeprefix("lorasurgeon.")
        for n in imports(module)
        if n == "lorasurgeon" or n.startswith("lorasurgeon.")
    }
    allowed = set(ORDER[: ORDER.index(module)])
    assert ours <= allowed, f"{module} imports {sorted(ours - allowed)}, which come after it"


def test_linalg_imports_only_torch() -> None:
    assert {n.split(".")[0] for n in imports("linalg")} <= {"torch", "__future__"}


@pytest.mark.parametrize("module", MODULES)
def test_only_render_and_cli_touch_the_terminal(module: str) -> None:
    top = {n.split(".")[0] for n in imports(module)}
    if module not in ("render", "cli"):
        assert not top & {"rich", "click"}, module
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]
        assert not calls, f"{module} prints"


@pytest.mark.parametrize("args", [["--help"], ["report", "samples/base", "--json"], ["report", "samples/adapter-lora"]])
def test_header_only_commands_never_import_torch(args: list[str]) -> None:
    """`import torch` takes seconds; a header-only report (and --help) must not pay for it (issue: a 100-shard
    checkpoint reports in well under a second). Checked in a fresh interpreter, where nothing imported it yet."""
    code = (
        "import sys\nfrom lorasurgeon.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
