"""The reliability guarantees (issue 6), each proven by a run that would fail without it.

Killed runs (SIGKILL, SIGINT, SIGTERM) are real subprocesses stopped while their temporary exists; space
and permission failures use a real size-limited tmpfs (skipped where it cannot be mounted) and RLIMIT_FSIZE.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from builders import read_tensors, run_cli, tree_hashes
from safetensors.torch import load_file, save_file

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.writer import TMP_MARK

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_PROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def one_error(stderr: str) -> str:
    """The single `Error:` line of a failed run (and proof there is no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if TMP_MARK in p.name)


# --- a checkpoint big enough to be caught mid-merge ---------------------------------------------------

LAYERS, WIDTH, RANK = 4, 2048, 4


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """67 MB of zero q_proj weights and a rank-4 PEFT adapter on all of them (B != 0)."""
    root = tmp_path_factory.mktemp("big")
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(LAYERS)]
    save_file({f"{n}.weight": torch.zeros(WIDTH, WIDTH) for n in names}, base / "model.safetensors")
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for n in names:
        factors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=generator)
        factors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=generator)
    save_file(factors, adapter / "adapter_model.safetensors")
    return base, adapter


# The merge in a real process, with every computed tensor held back 0.5 s: a merge of `big` takes well under a
# second now, and a signal sent once its temporary exists must still find it mid-merge, on any machine.
SLOW_MERGE = """
import sys, time
from lorasurgeon import surgery
from lorasurgeon.cli import main
compute = surgery.compute
surgery.compute = lambda *args: (time.sleep(0.5), compute(*args))[1]
main(sys.argv[1:])
"""


def start_merge(base: Path, adapter: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", SLOW_MERGE, "merge", str(base), str(adapter), "-o", str(out), *extra]
    # SIGINT back to its default: a job started with `&` by a script inherits it ignored, and Python then
    # never turns it into KeyboardInterrupt (the merge would rightly go on, as the shell asked).
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_temporary(process: subprocess.Popen[str], folder: Path) -> Path:
    """The run's temporary, once tensor bytes are being written into it (the run is then mid-merge)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for tmp in temporaries(folder):
            files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else [tmp]
            if any(f.stat().st_size > 1_000_000 for f in files if f.exists()):
                return tmp
        time.sleep(0.005)
    process.kill()
    raise AssertionError("the merge never started writing")


def expected_first_layer(adapter: Path) -> torch.Tensor:
    factors = load_file(adapter / "adapter_model.safetensors")
    a = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    return (8 / RANK) * (b @ a)


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(
    big: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = big
    before = tree_hashes(base, adapter)
    out = tmp_path / "merged"
    process = start_merge(base, adapter, out)
    stale = wait_for_temporary(process, tmp_path)
    process.send_signal(signal.SIGKILL)
    process.communicate()

    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert temporaries(tmp_path) == [stale]  # a SIGKILL cannot be caught: the temporary stays, by its name

    code, _, stderr = run_cli(["merge", str(base), str(adapter), "-o", str(out)], capsys)
    assert code == 0, stderr
    assert f"removed {stale}" in " ".join(stderr.split())
    assert temporaries(tmp_path) == []
    merged = load_file(out / "model.safetensors")
    torch.testing.assert_close(merged[Q_PROJ], expected_first_layer(adapter))
    assert merged[Q_PROJ].abs().max() > 0
    assert tree_hashes(base, adapter) == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_remove_the_temporary(big: tuple[Path, Path], tmp_path: Path, signum: int) -> None:
    base, adapter = big
    out = tmp_path / "merged"
    process = start_merge(base, adapter, out)
    wait_for_temporary(process, tmp_path)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "interrupted" in one_error(stderr)
    assert list(tmp_path.iterdir()) == []


def test_force_keeps_the_old_output_until_the_new_one_is_complete(
    big: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = big
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous output")
    old = tree_hashes(out)

    process = start_merge(base, adapter, out, "--force")
    wait_for_temporary(process, tmp_path)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert tree_hashes(out) == old  # killed mid-write: the old OUT is untouched

    code, _, stderr = run_cli(["merge", str(base), str(adapter), "-o", str(out)], capsys)
    assert code == 2
    assert "--force" in one_error(stderr)
    assert tree_hashes(out) == old

    code, _, stderr = run_cli(["merge", str(base), str(adapter), "-o", str(out), "--force"], capsys)
    assert code == 0, stderr
    torch.testing.assert_close(load_file(out / "model.safetensors")[Q_PROJ], expected_first_layer(adapter))
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary, no old copy


def test_a_swap_killed_half_way_is_undone_by_the_next_run(
    llama_dir: Path, llama_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill between moving the old OUT directory aside and renaming the new one in leaves the old one
    under a temporary name; the next run puts it back instead of deleting it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "merged"
    aside = tmp_path / f".merged{TMP_MARK}{dead.pid}-old"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the previous output")

    code, _, stderr = run_cli(["merge", str(llama_dir), str(llama_adapter), "-o", str(out)], capsys)

    assert code == 2
    assert "already exists" in one_error(stderr)
    assert (out / "model.safetensors").read_bytes() == b"the previous output"
    assert not aside.exists()


def test_failure_mid_write_with_force_keeps_the_old_output(
    fp16_base: Path, overflow_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous output")
    old = tree_hashes(out)
    code, _, stderr = run_cli(["merge", str(fp16_base), str(overflow_adapter), "-o", str(out), "--force"], capsys)
    assert code == 2
    assert Q_PROJ in one_error(stderr)
    assert tree_hashes(out) == old
    assert temporaries(tmp_path) == []


def test_force_on_a_single_file_output(
    fp16_base: Path, overflow_adapter: Path, llama_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file OUT is replaced by one atomic rename: intact after a failed run, replaced after a good one."""
    base = fp16_base / "model.safetensors"
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"the previous output")
    code, _, stderr = run_cli(["merge", str(base), str(overflow_adapter), "-o", str(out), "--force"], capsys)
    assert code == 2
    assert Q_PROJ in one_error(stderr)
    assert out.read_bytes() == b"the previous output"

    code, _, stderr = run_cli(["merge", str(base), str(llama_adapter), "-o", str(out), "--force"], capsys)
    assert code == 0, stderr
    merged, original = load_file(out), load_file(base)
    assert not torch.equal(merged[Q_PROJ], original[Q_PROJ])
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


# --- OUT may not be an input ------------------------------------------------------------------------------


def test_output_inside_an_input_is_refused_through_symlinks(
    llama_dir: Path, llama_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    adapter = Path(shutil.copytree(llama_adapter, tmp_path / "adapter"))
    (tmp_path / "alias").symlink_to(base)
    (tmp_path / "file-alias.safetensors").symlink_to(base / "model.safetensors")
    before = tree_hashes(base, adapter)
    attempts = [
        (base, ["-o", str(base / "merged")]),
        (base, ["-o", str(tmp_path / "alias" / "merged")]),
        (base, ["-o", str(tmp_path / "alias"), "--force"]),
        (base, ["-o", str(adapter), "--force"]),
        (base / "model.safetensors", ["-o", str(tmp_path / "file-alias.safetensors"), "--force"]),
    ]
    for source, options in attempts:
        code, _, stderr = run_cli(["merge", str(source), str(adapter), *options], capsys)
        assert code == 2, options
        assert "may not be an input" in one_error(stderr)
    assert tree_hashes(base, adapter) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "alias", "base", "file-alias.safetensors"]


# --- out of space, out of permission ----------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 kB tmpfs (the tiny Llama's merge needs about 110 kB); skipped where mounting is not allowed."""
    yield from _mount(tmp_path / "fs", "size=64k")


@pytest.fixture
def readonly_fs(tmp_path: Path) -> Iterator[Path]:
    yield from _mount(tmp_path / "ro", "ro,size=64k")


def _mount(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_free_space_is_checked_before_writing(
    llama_dir: Path, llama_adapter: Path, small_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = small_fs / "merged"
    code, _, stderr = run_cli(["merge", str(llama_dir), str(llama_adapter), "-o", str(out)], capsys)
    error = one_error(stderr)
    assert code == 2
    assert str(out) in error
    assert "needs 107.1 kB but only 65.5 kB is free" in error
    assert list(small_fs.iterdir()) == []


def test_running_out_of_space_while_writing_leaves_nothing(
    llama_dir: Path,
    llama_adapter: Path,
    small_fs: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The free-space check is fooled (another process could fill the disk after it), so the write itself
    hits ENOSPC."""
    usage = shutil.disk_usage(small_fs)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**12))
    out = small_fs / "merged"
    code, _, stderr = run_cli(["merge", str(llama_dir), str(llama_adapter), "-o", str(out)], capsys)
    error = one_error(stderr)
    assert code == 2
    assert f"{out}: out of space writing model.safetensors (the output needs 109.4 kB" in error
    assert list(small_fs.iterdir()) == []


def test_read_only_file_system(
    llama_dir: Path, llama_adapter: Path, readonly_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = readonly_fs / "merged"
    code, _, stderr = run_cli(["merge", str(llama_dir), str(llama_adapter), "-o", str(out)], capsys)
    error = one_error(stderr)
    assert code == 2
    assert str(readonly_fs) in error
    assert "Read-only file system" in error


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us


def test_file_size_limit_while_writing_leaves_nothing(llama_dir: Path, llama_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "merge", str(llama_dir), str(llama_adapter), "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    error = one_error(run.stderr)
    assert run.returncode == 2
    assert f"{out}: over the file size limit writing model.safetensors (the output needs 109.4 kB" in error
    assert list(tmp_path.iterdir()) == []


# --- numbers that cannot be trusted -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """The tiny Llama in fp16 with q_proj[0, 0] = 60000, near fp16's largest finite value 65504."""
    base = tmp_path_factory.mktemp("fp16") / "base"
    shutil.copytree(llama_dir, base)
    tensors = {k: v.half() for k, v in load_file(llama_dir / "model.safetensors").items()}
    tensors[Q_PROJ][0, 0] = 60000
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.fixture(scope="module")
def overflow_adapter(tmp_path_factory: pytest.TempPathFactory, llama_adapter: Path) -> Path:
    """The adapter with ΔW[0, 0] of q_proj = 2 · 4 · 1000 = 8000, pushing 60000 past fp16's range."""
    return _edited_adapter(tmp_path_factory, llama_adapter, "overflow", _overflow)


def _overflow(factors: dict[str, torch.Tensor]) -> None:
    factors[Q_PROJ_A][:, 0] = 1.0
    factors[Q_PROJ_B][0, :] = 1000.0


def _edited_adapter(
    factory: pytest.TempPathFactory, adapter: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    path = factory.mktemp(name) / "adapter"
    shutil.copytree(adapter, path)
    factors = load_file(adapter / "adapter_model.safetensors")
    edit(factors)
    save_file(factors, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("extra", [[], ["--allow-nonfinite"]], ids=["default", "allow-nonfinite"])
def test_overflow_of_the_target_dtype_is_an_error_naming_the_tensor(
    fp16_base: Path, overflow_adapter: Path, tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    code, _, stderr = run_cli(["merge", str(fp16_base), str(overflow_adapter), "-o", str(out), *extra], capsys)
    error = one_error(stderr)
    assert code == 2
    assert f"model.safetensors: {Q_PROJ}: 1 values overflow F16" in error
    assert list(tmp_path.iterdir()) == []


def test_the_same_merge_into_fp32_does_not_overflow(
    fp16_base: Path, overflow_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guard above is about the dtype, not the adapter: fp32 holds 68000 fine."""
    out = tmp_path / "merged"
    args = ["merge", str(fp16_base), str(overflow_adapter), "-o", str(out), "--dtype", "fp32"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    assert read_tensors(out)[Q_PROJ][0, 0] > 65504


@pytest.fixture(scope="module")
def nan_adapter(tmp_path_factory: pytest.TempPathFactory, llama_adapter: Path) -> Path:
    return _edited_adapter(tmp_path_factory, llama_adapter, "nan", lambda f: f[Q_PROJ_B].__setitem__((0, 0), torch.nan))


@pytest.fixture(scope="module")
def inf_base(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("inf") / "base"
    shutil.copytree(llama_dir, base)
    tensors = load_file(llama_dir / "model.safetensors")
    tensors[Q_PROJ][3, 5] = torch.inf
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_nan_in_an_adapter_is_refused_or_warned_about_by_name(
    command: str,
    llama_dir: Path,
    nan_adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "merged"
    code, _, stderr = run_cli([command, str(llama_dir), str(nan_adapter), "-o", str(out)], capsys)
    assert code == 2
    assert f"{Q_PROJ_B} -> {Q_PROJ}: holds 1 NaN/Inf values" in one_error(stderr)
    assert list(tmp_path.iterdir()) == []

    code, _, stderr = run_cli([command, str(llama_dir), str(nan_adapter), "-o", str(out), "--allow-nonfinite"], capsys)
    assert code == 0, stderr
    assert f"warning: {Q_PROJ_B} -> {Q_PROJ}: holds 1 NaN/Inf values" in " ".join(stderr.split())
    assert f"{Q_PROJ}: the result holds 32 NaN/Inf values" in " ".join(stderr.split())  # row 0 of B @ A
    merged = read_tensors(out)
    assert merged[Q_PROJ][0].isnan().all()
    assert merged[Q_PROJ][1:].isfinite().all()


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_inf_in_the_base_is_refused_or_warned_about_by_name(
    command: str,
    inf_base: Path,
    llama_adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "merged"
    code, _, stderr = run_cli([command, str(inf_base), str(llama_adapter), "-o", str(out)], capsys)
    assert code == 2
    assert f"model.safetensors: {Q_PROJ}: the base tensor holds 1 NaN/Inf values" in one_error(stderr)
    assert list(tmp_path.iterdir()) == []

    code, _, stderr = run_cli([command, str(inf_base), str(llama_adapter), "-o", str(out), "--allow-nonfinite"], capsys)
    assert code == 0, stderr
    assert f"warning: model.safetensors: {Q_PROJ}: the base tensor holds 1 NaN/Inf" in " ".join(stderr.split())
    merged = read_tensors(out)[Q_PROJ]
    assert merged[3, 5] == torch.inf
    assert int(merged.isfinite().sum()) == merged.numel() - 1


# --- the error funnel -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (LorasurgeonError("x.safetensors: line one\nline two"), "Error: x.safetensors: line one line two"),
        (PermissionError(13, "Permission denied", "/data/x.safetensors"), "Error: /data/x.safetensors: Permission"),
        (RuntimeError("boom"), "Error: internal error (RuntimeError: boom); this is a bug in lorasurgeon"),
    ],
    ids=["ours", "the OS's", "a bug"],
)
def test_every_failure_is_one_error_line_and_exit_2(
    raised: Exception, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(lorasurgeon, "check", fail)
    code, stdout, stderr = run_cli(["check", "base", "adapter"], capsys)
    assert code == 2
    assert one_error(stderr).startswith(expected)
    assert stdout == ""

    code, _, stderr = run_cli(["--debug", "check", "base", "adapter"], capsys)
    assert code == 2
    assert "Traceback" in stderr


def test_nonfinite_replacement_tensor_is_refused_or_warned(
    tmp_path: Path, llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A modules_to_save tensor replaces the base's: its NaN would be written as is, so it is checked too."""
    from builders import save_adapter
    from safetensors.torch import load_file, save_file

    adapter = save_adapter(llama_dir, tmp_path / "head", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    (head,) = [k for k in tensors if k.endswith("lm_head.weight")]
    tensors[head][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, stderr = run_cli(["merge", str(llama_dir), str(adapter), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and head in stderr and "1 NaN/Inf" in stderr and "lm_head.weight" in stderr
    assert not (tmp_path / "out").exists()
    args = ["merge", str(llama_dir), str(adapter), "-o", str(tmp_path / "out"), "--allow-nonfinite"]
    code, _, stderr = run_cli(args, capsys)
    assert code == 0 and "warning:" in stderr and head in stderr
    assert torch.isnan(read_tensors(tmp_path / "out")["lm_head.weight"]).sum() == 1


def test_dtype_conversion_overflow_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dtype fp16 of an untouched bf16 tensor holding 1e5 would write Inf: refused, naming the tensor."""
    from builders import save_adapter, save_model
    from safetensors.torch import load_file, save_file

    base = save_model(tmp_path / "base", dtype=torch.bfloat16)
    adapter = save_adapter(base, tmp_path / "lora", r=2, target_modules=["q_proj"])
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e5
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    code, _, stderr = run_cli(
        ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "fp16"], capsys
    )
    assert code == 2 and "model.norm.weight" in stderr and "overflow F16" in stderr
    assert not (tmp_path / "out").exists()
    code, _, _ = run_cli(["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--dtype", "fp32"], capsys)
    assert code == 0


# --- Ctrl-C at any moment: exit 130 and one line ------------------------------------------------------------

# The console entry point (lorasurgeon.__main__.run) in a child, which writes one byte to fd PIPE the moment
# its interrupt handlers are in place (what runs before them is Python's start-up and the package's __init__).
ENTRY = """
import os, sys, time
from lorasurgeon import interrupts
install = interrupts.exit_at_once
def traced():
    install()
    os.write(PIPE, b"r")
interrupts.exit_at_once = traced
PHASE
from lorasurgeon.__main__ import run
sys.argv = ["lorasurgeon", *ARGS]
run()
"""

# Hooks that announce a phase of the merge (one byte on PIPE) and wait there 1 s, so a signal sent on the
# announcement lands inside it: planning done (the writer not yet made), the first tensor, the last, the
# publish (inside the swap, where interrupts are held back until OUT is complete).
PHASES = {
    "plan": """
from lorasurgeon import writer
init = writer.CheckpointWriter.__init__
def announce(self, *a, **k):
    os.write(PIPE, b"p"); time.sleep(1); init(self, *a, **k)
writer.CheckpointWriter.__init__ = announce
""",
    "first tensor": """
from lorasurgeon import writer
calls = []
def hook(method):
    def wrapped(self, *a):
        calls.append(1)
        if len(calls) == 1:
            os.write(PIPE, b"p"); time.sleep(1)
        return method(self, *a)
    return wrapped
writer.ShardStream.write = hook(writer.ShardStream.write)
writer.ShardStream.copy_from = hook(writer.ShardStream.copy_from)
""",
    "last tensor": """
from lorasurgeon import writer
calls = []
def hook(method):
    def wrapped(self, *a):
        calls.append(1)
        if len(calls) == len(self._sizes):
            os.write(PIPE, b"p"); time.sleep(1)
        return method(self, *a)
    return wrapped
writer.ShardStream.write = hook(writer.ShardStream.write)
writer.ShardStream.copy_from = hook(writer.ShardStream.copy_from)
""",
    "publish": """
from lorasurgeon import writer
fsync_dir = writer._fsync_dir
def announce(path):
    if not os.environ.get("ANNOUNCED"):
        os.environ["ANNOUNCED"] = "1"; os.write(PIPE, b"p"); time.sleep(1)
    fsync_dir(path)
writer._fsync_dir = announce
""",
}


def start_entry(args: list[str], phase: str = "") -> tuple[subprocess.Popen[str], int]:
    read, write = os.pipe()
    code = ENTRY.replace("PIPE", str(write)).replace("ARGS", repr(args)).replace("PHASE", PHASES.get(phase, ""))
    code = code.replace("PIPE", str(write))
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(write,),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(write)
    return process, read


def wait_for(read: int, count: int) -> None:
    """Block until the child has written `count` bytes on the pipe."""
    got = b""
    while len(got) < count:
        chunk = os.read(read, count - len(got))
        assert chunk, "the child ended before announcing"
        got += chunk


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.2])
def test_ctrl_c_during_start_up_exits_130_with_one_line(
    llama_dir: Path, llama_adapter: Path, tmp_path: Path, delay: float
) -> None:
    """While the CLI, click, rich and then torch import (about 2 s), a Ctrl-C printed a KeyboardInterrupt
    traceback and the process died of the signal (-2)."""
    out = tmp_path / "merged"
    process, read = start_entry(["merge", str(llama_dir), str(llama_adapter), "-o", str(out)])
    wait_for(read, 1)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    os.close(read)
    if delay <= 0.3:  # torch alone takes longer than this to import: the merge cannot have finished
        assert process.returncode == 130, stderr
    if process.returncode == 130:
        assert one_error(stderr) == "Error: interrupted; nothing was written"
        assert list(tmp_path.iterdir()) == []
    else:  # the signal came after the merge had finished: its answer stands
        assert process.returncode == 0 and "Traceback" not in stderr, stderr
        assert read_tensors(out)


@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_in_each_phase_of_a_merge(llama_dir: Path, llama_adapter: Path, tmp_path: Path, phase: str) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous output")
    old = tree_hashes(out)
    process, read = start_entry(["merge", str(llama_dir), str(llama_adapter), "-o", str(out), "--force"], phase)
    wait_for(read, 2)  # the handlers, then the phase
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    os.close(read)

    assert process.returncode == 130, stderr
    error = one_error(stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary, no old copy moved aside
    if phase == "publish":  # held back until the swap was done: OUT is the new one, whole
        assert error == f"Error: interrupted after {out} was written completely"
        merged = read_tensors(out)
        assert not torch.equal(merged[Q_PROJ], read_tensors(llama_dir)[Q_PROJ])
    else:
        assert error == "Error: interrupted; nothing was written"
        assert tree_hashes(out) == old


def test_the_entry_point_imports_nothing_heavy_before_its_handlers() -> None:
    code = (
        "import sys, lorasurgeon.__main__\n"
        "heavy = sorted(m for m in ('torch', 'click', 'rich', 'lorasurgeon.cli') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_debug_is_accepted_after_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorasurgeon.cli import hoist_group_flags

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(lorasurgeon, "check", fail)
    code, _, stderr = run_cli(["check", "base", "adapter", "--debug"], capsys)
    assert code == 2 and "Traceback" in stderr and "RuntimeError: boom" in stderr
    assert hoist_group_flags(["merge", "--debug", "a", "b"]) == ["--debug", "merge", "a", "b"]
    assert hoist_group_flags(["merge", "a", "--", "--debug"]) == ["merge", "a", "--", "--debug"]  # a name after --
    assert hoist_group_flags(["report", "a", "--download", "--debug"]) == ["--debug", "--download", "report", "a"]


def test_version() -> None:
    from importlib import metadata

    from lorasurgeon.version import __version__

    assert __version__ == metadata.version("lorasurgeon") and __version__[0].isdigit()
