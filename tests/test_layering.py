"""The architecture rule of ARCHITECTURE.md, per module: each module imports only the lorasurgeon modules its entry
allows (the I/O wing knows no adapters, formats know no plan, maths does no I/O); the maths imports only torch;
only render and cli import rich or click; nothing below cli prints; formats, the plan and the header reader never
import torch at module level (header-only commands start without it)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "lorasurgeon"
IO = {"errors", "header", "checkpoint", "hub"}
FILES = {"errors", "input_file"}
NORMAL_FORM = {"adapter", *IO}
FORMATS_CORE = {"formats.peft", "formats.peft_config", "formats.config_fields", "formats.kohya", "formats.diffusers"}
# module -> the lorasurgeon modules it may import ("formats" is the package's __init__).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "version": set(),
    "interrupts": set(),
    "strict_json": set(),
    "input_file": {"errors"},
    "header_json": {"errors", "strict_json"},
    "header": FILES | {"header_json"},
    "layout": FILES,
    "checkpoint": FILES | {"header", "hub", "layout", "strict_json"},
    "hub": {"errors"},
    "temporaries": {"errors"},
    "shard_stream": IO,
    "writer": IO | {"input_file", "interrupts", "shard_stream", "temporaries"},
    "blocks": set(),
    "linalg": {"blocks"},
    "devices": {"errors"},
    "lycoris": set(),
    "lowering": {"errors"},
    "verdict": {"errors"},
    "progress": set(),
    "units": set(),
    "rank_rule": {"errors"},
    "tuner_maths": set(),
    "rotations": set(),
    "weight_products": set(),
    "fp8": set(),
    "fp8_merge": {"fp8", "fp8_kernel"},
    "fp8_kernel": {"devices", "fp8"},
    "experts": set(),
    "quantized": set(),
    "compressed": {"errors"},
    "requant": {"compressed", "fp8", "fp8_merge", "quantized"},
    "factored": {"errors"},
    "stacked_sum": {"errors", "factored"},
    "spectrum_rules": {"errors"},
    "budget": {"errors"},
    "dense_merge": {"errors", "factored"},
    "adapter": IO,
    "tuner_shapes": {"adapter", "lycoris"},
    "tuner_kinds": {"adapter"},
    "tuner_deltas": {"adapter", "lycoris", "tuner_maths"},
    "tuner_products": {"adapter", "errors", "rotations", "weight_products", "tuner_kinds"},
    "tuner_merge": {"adapter", "errors", "tuner_deltas", "tuner_kinds", "tuner_products", "tuner_shapes"},
    "formats.config_fields": {"errors"},
    "formats.architectures": {"errors", "header"},
    "formats.sd_layouts": set(),
    "formats.peft_config": {"errors", "header", "formats.config_fields"},
    "formats.peft_tuner_config": {"errors", "formats.config_fields", "formats.peft_config"},
    "formats.peft_tuner_additive": {"lycoris", "formats.peft_tuner_config"},
    "formats.peft_tuner_products": {"formats.peft_tuner_config"},
    "formats.peft_tuner_inventory": {"formats.peft_tuner_config", "formats.peft_tuner_additive"}
    | {"formats.peft_tuner_products"},
    "formats.peft_tuners": NORMAL_FORM
    | {"formats.peft_config", "formats.peft_tuner_config", "formats.peft_tuner_inventory"},
    "formats.transformers_names": set(),
    "formats.moe": {"formats.transformers_names"},
    "formats.fp8_block": {"errors", "header", "quantized"},
    "formats.compressed_checkpoint": {"errors", "header", "quantized"},
    "formats.quantization": {"errors", "header", "quantized", "formats.compressed_checkpoint", "formats.fp8_block"},
    "formats.peft_parameters": {"adapter", "errors", "formats.moe", "formats.peft_config"},
    "formats.peft": NORMAL_FORM | {"formats.peft_config", "writer"} | {"formats.peft_parameters"},
    "formats.kohya": NORMAL_FORM | {"formats.peft_config_writer", "lycoris"},
    "formats.kohya_names": NORMAL_FORM | {"formats.kohya", "formats.sd_layouts"},
    "formats.diffusers": NORMAL_FORM | {"formats.kohya", "formats.peft", "formats.peft_config"},
    "formats.resolution": NORMAL_FORM
    | {"formats.architectures", "formats.kohya", "formats.kohya_names"}
    | {"formats.transformers_names"},
    "formats.naming": NORMAL_FORM | {"formats.kohya", "formats.kohya_names"} | {"formats.sd_layouts"},
    "formats.scale_form": {"formats.peft_config_writer"},
    "formats.peft_config_writer": set(),
    "formats.limits": {"adapter", "errors"},
    "formats.writing": NORMAL_FORM
    | {"formats.peft", "formats.kohya", "formats.diffusers", "formats.peft_config_writer"}
    | {"formats.model_classes", "formats.scale_form"}
    | {"formats.peft_parameters"},
    "formats": NORMAL_FORM
    | FORMATS_CORE
    | {"formats.naming", "formats.peft_tuners", "linalg"}
    | {"formats.quantization"},
    "formats.model_classes": set(),
    "ties": NORMAL_FORM | {"formats.architectures", "formats.model_classes", "formats.transformers_names"},
    "formats.computed": NORMAL_FORM
    | {"formats.diffusers", "formats.kohya", "formats.peft", "formats.naming", "formats.peft_config_writer"}
    | {"formats.limits", "formats.writing", "writer"},
    "fit": NORMAL_FORM | {"formats.architectures", "formats.resolution", "lycoris"},
    "model_config": set(),
    "tuner_placement": NORMAL_FORM | {"formats.architectures", "tuner_kinds", "tuner_shapes"},
    "expert_fit": NORMAL_FORM | {"fit", "formats.moe", "formats.resolution"},
    "conflicts": {"errors", "placement", "plan", "tuner_placement"},
    "quantized_plan": IO | {"formats.quantization", "quantized"},
    "placement": {"adapter", "errors", "header", "expert_fit", "fit", "formats.moe", "formats.resolution"}
    | {"tuner_placement"},
    "plan": NORMAL_FORM
    | {"placement", "ties", "model_config", "formats.architectures", "formats.resolution", "tuner_placement"}
    | {"conflicts", "expert_fit", "quantized", "quantized_plan"},
    "tuner_steps": {"plan", "tuner_merge", "tuner_placement"},
    "mirror": IO | {"layout", "plan", "version", "writer"},
    "workspace": IO,
    "terms": {"errors", "header", "experts", "linalg", "lycoris", "placement", "plan"},
    "quantized_steps": {"blocks", "devices", "errors", "fp8", "header", "plan", "read_ahead", "requant", "terms"},
    "read_ahead": {"checkpoint", "plan", "quantized", "workspace"},
    "step_checks": {"errors", "header", "linalg", "plan"},
    "surgery": NORMAL_FORM
    | {"linalg", "lycoris", "mirror", "placement", "plan", "progress", "tuner_steps", "writer", "workspace"}
    | {"devices", "quantized_steps", "read_ahead", "shard_stream", "step_checks", "terms"},
    "decomposition": {"linalg", "rank_rule"},
    "pairing": IO | {"rank_rule", "formats.architectures"},
    "cluster": {"errors"},
    "journal": IO,
    "matrix_task": {"devices", "errors", "header", "decomposition", "rank_rule"},
    "extract_steps": {"errors", "cluster", "decomposition", "journal", "matrix_task", "pairing", "progress"}
    | {"formats.peft"}
    | {"formats.moe"},
    "extraction": IO
    | {"decomposition", "pairing", "progress", "writer", "formats.architectures", "formats.peft"}
    | {"formats.model_classes"}
    | {"formats.peft_config_writer", "formats.scale_form", "cluster", "extract_steps", "journal"},
    "tuner_lora": {"adapter", "tuner_deltas", "tuner_maths"},
    "tuner_conversion": NORMAL_FORM
    | {"plan", "writer", "formats", "formats.peft", "formats.peft_config", "tuner_deltas", "tuner_kinds"}
    | {"formats.peft_config_writer", "tuner_lora", "tuner_placement"},
    "conversion": NORMAL_FORM
    | {"plan", "writer", "formats", "formats.kohya", "formats.naming", "formats.peft"}
    | {"formats.peft_config", "formats.resolution", "formats.writing", "tuner_conversion", "lowering"}
    | {"formats.limits", "runtime_lowering"},
    "census": IO,
    "client_weights": {"errors"},
    "combination": NORMAL_FORM | {"formats.computed", "formats.limits"},
    "combined_module": {"combination", "dense_merge", "factored", "header", "stacked_sum"},
    "algebra_task": {"combination", "combined_module", "devices", "factored", "header", "matrix_task"}
    | {"spectrum_rules"},
    "algebra_steps": {"adapter", "algebra_options", "algebra_task", "cluster", "combination", "errors", "header"}
    | {"extract_steps", "journal", "matrix_task"},
    "algebra_options": {"adapter", "client_weights", "combination", "errors", "spectrum_rules"},
    "algebra": NORMAL_FORM
    | {"algebra_options", "budget", "combination", "combined_module", "devices", "factored", "spectrum_rules"}
    | {"algebra_steps", "algebra_task", "cluster", "extract_steps", "extraction", "journal"}
    | {"formats", "formats.computed", "writer"},
    "adapter_facts": NORMAL_FORM | {"formats", "formats.architectures", "ties"},
    "runtime_checks": {"adapter_facts"},
    "runtime_rules": {"runtime_checks"},
    "runtimes": NORMAL_FORM | {"adapter_facts", "runtime_checks", "runtime_rules"},
    "runtime_lowering": NORMAL_FORM
    | {"adapter_facts", "runtimes", "lowering", "ties", "formats.architectures", "formats.peft", "formats.peft_config"}
    | {"formats.writing"},
    "companions": {"checkpoint"},
    "verify_task": {"adapter", "checkpoint", "devices", "errors", "header", "matrix_task", "placement", "plan"}
    | {"surgery"}
    | {"verdict"},
    "verify_steps": {"checkpoint", "cluster", "errors", "journal", "matrix_task", "plan", "progress", "verdict"}
    | {"verify_task"},
    "verification": NORMAL_FORM
    | {"cluster", "companions", "plan", "progress", "verdict", "verify_steps", "verify_task"},
    "rules": {"errors", "header", "report"},
    "tuner_report": {"adapter", "formats.peft_tuner_inventory", "tuner_kinds"},
    "stats": {"checkpoint", "experts", "linalg", "lycoris", "progress", "report"},
    "report": NORMAL_FORM
    | {"census", "rules", "formats", "formats.peft_config", "linalg", "lycoris", "plan"}
    | {"progress", "tuner_report"}
    | {"formats.moe", "formats.quantization", "stats"},
    "__init__": NORMAL_FORM
    | {"formats", "formats.naming", "report", "rules", "plan", "surgery", "adapter_api"}
    | {"progress", "extraction", "conversion", "arguments"}
    | {"algebra", "combination", "devices", "runtime_rules", "runtimes", "verification", "version"}
    | {"cluster", "verify_steps"},
    "adapter_api": {"checkpoint", "devices", "errors", "progress", "pairing", "rank_rule", "cluster", "extract_steps"}
    | {"extraction", "conversion"},
    "arguments": {"errors", "checkpoint", "devices", "hub", "plan"},
    "documents": {"errors", "census", "report", "plan", "surgery", "expert_fit", "verification", "cluster"},
    "adapter_documents": {"documents", "extraction", "conversion", "algebra"},
    "views": {"extraction", "conversion", "verification", "units"},
    "report_views": {"census", "report", "units", "views"},
    "progress_bar": {"progress", "units"},
    "tables": set(),
    "finding_groups": {"errors"},
    "digest": {"census", "expert_fit", "quantized_steps", "report"},
    "render": {"errors", "documents", "report", "plan", "surgery", "extraction", "conversion", "cluster"}
    | {"finding_groups", "progress", "progress_bar", "tables", "units", "verification", "views"}
    | {"digest", "algebra", "adapter_documents", "report_views"},
    "cli_options": {"__init__"},
    "cli_adapter_commands": {"__init__", "adapter_documents", "cli_options", "documents", "render"},
    "cli": {"__init__", "cli_adapter_commands", "cli_options", "documents", "errors", "hub", "interrupts", "render"}
    | {"report_views", "views"},
    "__main__": {"cli", "interrupts"},
}
NO_TORCH_AT_IMPORT = ["header", "plan", "fit", "ties", "model_config", "tuner_placement", "tuner_shapes", "tuner_kinds"]
NO_TORCH_AT_IMPORT += ["pairing", "rank_rule", "progress", "progress_bar", "units", "tables", "finding_groups"]
NO_TORCH_AT_IMPORT += ["conflicts", "expert_fit", "quantized", "quantized_plan", "placement", "adapter_api"]
NO_TORCH_AT_IMPORT += ["combination", "client_weights", "algebra_options", "spectrum_rules", "devices"]
NO_TORCH_AT_IMPORT += ["adapter_facts", "runtime_checks", "runtime_rules", "runtimes", "companions", "runtime_lowering"]
NO_TORCH_AT_IMPORT += ["shard_stream"]
NO_TORCH_AT_IMPORT += ["views", "report_views", "arguments", *(m for m in ALLOWED if m.startswith("formats"))]
# the modules that may import rich or click
TERMINAL = {"render", "cli", "cli_options", "cli_adapter_commands", "progress_bar", "tables"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        names.append("__init__" if name == "__init__" else name)
    return names


def path_of(module: str) -> Path:
    if module == "__init__":
        return PACKAGE / "__init__.py"
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def ours(node: ast.ImportFrom | ast.Import) -> set[str]:
    """The lorasurgeon modules one import statement names (`from lorasurgeon import merge` is the package API)."""
    if isinstance(node, ast.Import):
        return {a.name.removeprefix("lorasurgeon.") for a in node.names if a.name.startswith("lorasurgeon.")}
    if not node.module or not node.module.startswith("lorasurgeon"):
        return set()
    inner = node.module.removeprefix("lorasurgeon").lstrip(".")
    if inner not in ("", "formats"):
        return {inner}
    found = set()
    for alias in node.names:
        name = f"{inner}.{alias.name}".lstrip(".")
        found.add(name if path_of(name).is_file() else inner or "__init__")
    return found


def imports(module: str) -> tuple[set[str], set[str]]:
    """(lorasurgeon modules, other top-level packages) the module imports anywhere in its body."""
    tree = ast.parse(path_of(module).read_text())
    mine: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mine |= ours(node)
            if isinstance(node, ast.Import):
                others |= {a.name.split(".")[0] for a in node.names}
            elif node.module and node.level == 0:
                others.add(node.module.split(".")[0])
    return mine, others - {"lorasurgeon"}


def test_every_module_has_an_entry() -> None:
    assert set(module_names()) == set(ALLOWED), set(module_names()) ^ set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_only_what_its_entry_allows(module: str) -> None:
    mine, _ = imports(module)
    assert mine <= ALLOWED[module], f"{module} imports {sorted(mine - ALLOWED[module])}, which its entry does not allow"


MATHS = [
    "linalg",
    "blocks",
    "lycoris",
    "fp8",
    "fp8_merge",
    "fp8_kernel",
    "experts",
    "factored",
    "stacked_sum",
    "spectrum_rules",
    "budget",
]
MATHS += ["dense_merge", "lowering", "verdict"]


@pytest.mark.parametrize("module", MATHS)
def test_maths_imports_only_torch(module: str) -> None:
    """hashlib is for dense_merge's DARE masks, seeded from (seed, module, adapter) and nothing else; fp8_kernel
    is the CPU FP8 merge compiled by numba, on numpy arrays, on a pool of threads."""
    allowed = {"torch", "__future__", "math", "collections", "dataclasses", "typing", "hashlib"}
    if module == "fp8_kernel":
        allowed |= {"numba", "numpy", "threading", "concurrent", "functools"}
    assert imports(module)[1] <= allowed


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_only_render_and_cli_touch_the_terminal(module: str) -> None:
    if module in TERMINAL:
        return
    assert not imports(module)[1] & {"rich", "click"}, module
    tree = ast.parse(path_of(module).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "print"]
    assert not calls, f"{module} prints"


@pytest.mark.parametrize("module", NO_TORCH_AT_IMPORT)
def test_never_imports_torch_at_module_level(module: str) -> None:
    """Only statements that run on import count: imports inside functions and under TYPE_CHECKING do not."""
    tree = ast.parse(path_of(module).read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] == "torch"}, module
    heavy = {"linalg", "surgery", "writer", "extraction", "decomposition", "conversion", "terms", "quantized_steps"}
    heavy |= {"experts", "fp8", "fp8_merge", "fp8_kernel", "requant", "compressed", "read_ahead", "step_checks"}
    mine = set().union(*(ours(n) for n in top))
    assert not mine & heavy, f"{module} imports {sorted(mine & heavy)} (which import torch) at module level"


@pytest.mark.parametrize(
    "args",
    [["--help"], ["report", "samples/base", "--json"], ["report", "samples/adapter-lora"], ["check", "--help"]],
)
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


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "samples/base", "samples/base", "--rank", "0"],
        ["extract", "samples/base", "samples/base", "--energy", "2"],
        ["extract", "samples/base", "no-such-dir", "--rank", "4"],
        ["merge", "no-such-dir", "samples/adapter-lora"],
        ["merge", "samples/base", "no-such-dir"],
        ["unmerge", "no-such-dir", "samples/adapter-lora"],
        ["merge", "samples/base", "samples/adapter-lora", "--device", "tpu"],
        ["merge", "samples/base", "samples/adapter-lora", "--weight", "1", "--weight", "2"],
        ["merge", "samples/base", "samples/adapter-lora", "--no-such-option"],
    ],
)
def test_errors_that_need_no_tensor_data_come_before_torch(args: list[str]) -> None:
    """A bad option or a missing path is said at once (exit 2), not after the seconds `import torch` takes."""
    code = (
        "import sys\nfrom lorasurgeon.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
        "else:\n    raise AssertionError('no error')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Error:" in result.stderr and "Traceback" not in result.stderr


def test_architecture_names_exactly_the_modules() -> None:
    """ARCHITECTURE.md's module map has one row per file of lorasurgeon/ and lorasurgeon/formats/, no more."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))
    files = {p.name for p in PACKAGE.iterdir() if p.is_file()}
    files |= {f"formats/{p.name}" for p in (PACKAGE / "formats").iterdir() if p.is_file()}
    assert named == files, named ^ files
