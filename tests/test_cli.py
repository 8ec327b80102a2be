"""The command line: exit codes, --json, default outputs, and the core's bad-input cases (issue 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import read_tensors, run_cli, tree_hashes
from safetensors.torch import load_file, save_file

from lorasurgeon.cli import cli

ROOT = Path(__file__).parent.parent


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    return run_cli([str(a) for a in args], capsys)


def test_every_command_has_help_and_a_readme_example(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    for name in cli.commands:
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and "Example:" in out, name
        assert f"lorasurgeon {name} " in readme, f"README has no example of `lorasurgeon {name}`"


def test_check_fits_and_json(capsys: pytest.CaptureFixture[str], llama_dir: Path, llama_adapter: Path) -> None:
    code, out, err = run(capsys, "check", llama_dir, llama_adapter, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] is True and len(doc["modules"]) == 14 and doc["findings"] == []
    assert {m["base_key"] for m in doc["modules"]} >= {"model.layers.1.mlp.down_proj.weight"}
    code, out, err = run(capsys, "check", llama_dir, llama_adapter)
    assert code == 0 and out == "" and "fits" in err


def test_merge_defaults_to_cwd_and_says_where(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    code, out, err = run(capsys, "merge", llama_dir, llama_adapter)
    assert code == 0 and out == ""
    assert (work / "base-merged" / "model.safetensors").is_file() and "base-merged" in err
    code, out, err = run(capsys, "merge", llama_dir / "model.safetensors", llama_adapter)
    assert code == 0 and (work / "model-merged.safetensors").is_file()


def test_dry_run_writes_nothing(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    code, out, err = run(capsys, "merge", llama_dir, llama_adapter, "--dry-run", "-o", work / "x")
    assert code == 0 and "14 of 21 tensors would change" in err and list(work.iterdir()) == []
    code, out, _ = run(capsys, "merge", llama_dir, llama_adapter, "--dry-run", "--json")
    doc = json.loads(out)
    assert doc["dry_run"] is True and doc["changed"] == 14 and list(work.iterdir()) == []


def test_json_summary_is_the_only_stdout(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    code, out, _ = run(capsys, "merge", llama_dir, llama_adapter, "-o", work / "m", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["changed"] == 14 and doc["tensors"] == 21 and doc["copied_files"]


def test_unmerge_restores_the_base(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    assert run(capsys, "merge", llama_dir, llama_adapter, "-o", work / "m")[0] == 0
    assert run(capsys, "unmerge", work / "m", llama_adapter, "-o", work / "u")[0] == 0
    base, merged, restored = (read_tensors(p) for p in (llama_dir, work / "m", work / "u"))
    for name, tensor in base.items():
        delta = (merged[name] - tensor).abs()
        assert ((restored[name] - tensor).abs() <= 2 * 2.0**-24 * (tensor.abs() + delta) + 1e-30).all(), name
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_scale_zero_leaves_the_base(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    assert run(capsys, "merge", llama_dir, llama_adapter, "--scale", "0", "-o", work / "m")[0] == 0
    base, merged = read_tensors(llama_dir), read_tensors(work / "m")
    assert all(torch.equal(base[n], merged[n]) for n in base)


def test_real_subprocess_on_the_samples(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorasurgeon",
            "merge",
            ROOT / "samples/base",
            ROOT / "samples/adapter-rslora",
            "-o",
            tmp_path / "merged",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["changed"] == 14


# --- bad input: each a clean one-line error, the right exit code, nothing written, inputs unchanged ---


def _adapter_copy(
    src: Path,
    dst: Path,
    edit_tensors: Callable[[dict], None] | None = None,
    edit_config: Callable[[dict], None] | None = None,
) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((dst / "adapter_config.json").read_text())
        edit_config(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _rename_target(t: dict) -> None:
    for part in ("lora_A", "lora_B"):
        t[f"{Q.replace('q_proj', 'qq_proj')}.{part}.weight"] = t.pop(f"{Q}.{part}.weight")


def _nan_in_b(t: dict) -> None:
    t[f"{Q}.lora_B.weight"][0, 0] = float("nan")


def _wrong_shape(t: dict) -> None:
    t[f"{Q}.lora_A.weight"] = torch.randn(4, 16)


def _rank_in_config(c: dict) -> None:
    c["r"] = 8


def _target_absent_config(c: dict) -> None:
    c["target_modules"] = [*c["target_modules"], "qq_proj"]


CASES = {
    # name: (command, expected exit code, expected words in the error, how to make the bad input)
    "truncated base": ("merge", 2, "truncated", "truncate"),
    "not safetensors": ("merge", 2, "not a safetensors file", "garbage"),
    "rank mismatch": ("merge", 2, "has rank 4 but adapter_config.json says 8", (None, _rank_in_config)),
    "rank mismatch (check)": ("check", 1, "has rank 4 but adapter_config.json says 8", (None, _rank_in_config)),
    "shape mismatch": ("merge", 2, "does not fit the base shape", (_wrong_shape, None)),
    "target absent": ("merge", 2, "is not in the base checkpoint", (_rename_target, _target_absent_config)),
    "target absent (check)": ("check", 1, "is not in the base checkpoint", (_rename_target, _target_absent_config)),
    "NaN in B": ("merge", 2, "NaN/Inf", (_nan_in_b, None)),
    "missing alpha": ("merge", 2, "pass --alpha", "no-config"),
    "OUT exists": ("merge", 2, "already exists", "out-exists"),
    "OUT is BASE": ("merge", 2, "may not be an input", "out-is-base"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llama_dir: Path, llama_adapter: Path, case: str
) -> None:
    command, expected_code, words, how = CASES[case]
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    adapter = tmp_path / "adapter"
    out = tmp_path / "out"
    if how == "truncate":
        data = (base / "model.safetensors").read_bytes()
        (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        (base / "model.safetensors").write_bytes(b"this is not a checkpoint at all" * 10)
    elif how == "no-config":
        adapter.mkdir()
        shutil.copy(llama_adapter / "adapter_model.safetensors", adapter / "adapter.safetensors")
        adapter = adapter / "adapter.safetensors"
    elif how == "out-exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif how == "out-is-base":
        out = base
    if not isinstance(how, tuple):
        if not adapter.exists():
            shutil.copytree(llama_adapter, adapter)
    else:
        _adapter_copy(llama_adapter, adapter, *how)
    before = tree_hashes(base, adapter) | (tree_hashes(out) if out.exists() else {})
    listing = sorted(p.name for p in tmp_path.iterdir())
    args = [command, base, adapter] + (["-o", out] if command == "merge" else [])
    code, _stdout, stderr = run(capsys, *args)
    assert code == expected_code, stderr
    assert words in stderr and "Traceback" not in stderr
    if expected_code == 2:
        assert stderr.count("Error:") == 1 and stderr.startswith("Error: ") and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written, no temporary left
    assert (tree_hashes(base, adapter) | (tree_hashes(out) if out.exists() else {})) == before


def test_readme_examples_are_current() -> None:
    """README.md's examples, run in order in a clean clone after its quick start, print what it shows and leave
    nothing .gitignore does not list (samples/update_readme.py --check)."""
    result = subprocess.run(
        [sys.executable, ROOT / "samples/update_readme.py", "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
