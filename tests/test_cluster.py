"""extract on a Ray cluster and resumed after a kill (issue 17): the same bytes as the local run, whatever fails.

The oracle is lorasurgeon's own local run (threads=1, randomized SVD, so each matrix's seed matters): a cluster
run, a run whose worker was killed mid-task and a resumed run must write the same adapter, byte for byte. One
local Ray instance (2 CPUs, small object store, no dashboard) serves the whole module; tests that need no Ray
(resume on one machine, seeds, a changed input) run first and skip nothing when Ray is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import PROJECTIONS, read_tensors
from killing import KilledOnce, kill_when_marked
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon import extract_steps
from lorasurgeon.errors import LorasurgeonError, UnsupportedError
from lorasurgeon.extraction import JOURNAL
from lorasurgeon.matrix_task import MatrixOutcome, MatrixTask, matrix_seed, run_matrix_task
from lorasurgeon.writer import TMP_MARK

ROOT = Path(__file__).resolve().parent.parent
OPTIONS: dict[str, Any] = {"rank": 4, "method": "randomized", "threads": 1}
ADAPTER = "adapter_model.safetensors"
MATRICES = 2 * len(PROJECTIONS)


def make_tuned(base: Path, out: Path, seed: int = 7) -> Path:
    """BASE with a full-rank change on every projection (the randomized SVD then depends on its sketch)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = read_tensors(base)
    for name, weight in tensors.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            tensors[name] = weight + 0.05 * torch.randn(weight.shape, generator=generator)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> tuple[Path, Path, bytes]:
    """(BASE, TUNED, the bytes of the local run's adapter_model.safetensors)."""
    root = tmp_path_factory.mktemp("pair")
    tuned = make_tuned(llama_dir, root / "tuned")
    reference = root / "reference"
    lorasurgeon.extract(llama_dir, tuned, reference, **OPTIONS)
    return llama_dir, tuned, (reference / ADAPTER).read_bytes()


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if TMP_MARK in p.name)


def journal_entries(folder: Path) -> list[Path]:
    return [p for tmp in temporaries(folder) for p in (tmp / JOURNAL).glob("*.safetensors")]


# --- without Ray -----------------------------------------------------------------------------------------


def test_each_matrix_has_its_own_seed_whatever_else_is_extracted(
    pair: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    """Independent of order and company: extracting only the q projections gives their factors bit for bit."""
    base, tuned, reference = pair
    alone = tmp_path / "q"
    lorasurgeon.extract(base, tuned, alone, targets=["*.q_proj"], **OPTIONS)
    full, subset = read_tensors(_written(reference, tmp_path)), read_tensors(alone / ADAPTER)
    assert len(subset) == 4 and set(subset) < set(full)
    assert all(torch.equal(subset[k], full[k]) for k in subset)
    assert matrix_seed(0, "a.weight") != matrix_seed(0, "b.weight") != matrix_seed(1, "b.weight")
    other_seed = _run_task_with_seed(base, tuned, 1)
    assert not torch.equal(other_seed, full[next(k for k in subset if k.endswith("lora_A.weight"))])


def _written(data: bytes, folder: Path) -> Path:
    path = folder / "reference.safetensors"
    path.write_bytes(data)
    return path


def _run_task_with_seed(base: Path, tuned: Path, seed: int) -> torch.Tensor:
    """Layer 0's q_proj A factor with another rule seed: proof that the seed reaches the sketch."""
    from lorasurgeon.checkpoint import Checkpoint
    from lorasurgeon.decomposition import RankRule
    from lorasurgeon.extract_steps import Execution, matrix_tasks
    from lorasurgeon.pairing import ExtractOptions, plan_extract

    options = ExtractOptions(rule=RankRule(rank=4, method="randomized", seed=seed), targets=("*.0.self_attn.q_proj",))
    with Checkpoint.open(base) as b, Checkpoint.open(tuned) as t:
        [task] = matrix_tasks(plan_extract(b, t, options), options, torch.device("cpu"), Execution(threads=1))
    a = run_matrix_task(task).a
    assert a is not None
    return a


class Interrupted(KeyboardInterrupt):
    pass


def interrupt_after(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task function, interrupted (as by ^C) when it is called for the matrix after `count`."""
    calls = []

    def task(t: MatrixTask) -> MatrixOutcome:
        calls.append(t)
        if len(calls) > count:
            raise Interrupted
        return run_matrix_task(t)

    monkeypatch.setattr(extract_steps, "run_matrix_task", task)


def test_interrupted_local_extract_resumes_where_it_stopped(
    pair: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned, reference = pair
    out = tmp_path / "lora"
    interrupt_after(MATRICES - 2, monkeypatch)  # killed at 86 %
    with pytest.raises(Interrupted):
        lorasurgeon.extract(base, tuned, out, **OPTIONS)
    assert not out.exists()
    assert len(journal_entries(tmp_path)) == MATRICES - 2
    monkeypatch.undo()

    summary = lorasurgeon.extract(base, tuned, out, resume=True, **OPTIONS)
    assert summary.work is not None and summary.work.resumed == MATRICES - 2 and summary.work.steps == 2
    assert (out / ADAPTER).read_bytes() == reference
    assert temporaries(tmp_path) == [] and not (out / JOURNAL).exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", ADAPTER]


def test_a_changed_input_is_never_mixed_in(
    pair: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _, reference = pair
    changed = make_tuned(base, tmp_path / "tuned", seed=8)
    out = tmp_path / "lora"
    interrupt_after(5, monkeypatch)
    with pytest.raises(Interrupted):
        lorasurgeon.extract(base, changed, out, **OPTIONS)
    monkeypatch.undo()
    make_tuned(base, changed, seed=7)  # TUNED rewritten in place with other values: its size stays, its mtime not
    summary = lorasurgeon.extract(base, changed, out, resume=True, **OPTIONS)
    assert summary.work is not None and summary.work.resumed == 0 and summary.work.steps == MATRICES
    assert (out / ADAPTER).read_bytes() == reference


def test_damaged_entry_is_computed_again_and_failures_of_the_inputs_keep_nothing(
    pair: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned, reference = pair
    out = tmp_path / "lora"
    interrupt_after(4, monkeypatch)
    with pytest.raises(Interrupted):
        lorasurgeon.extract(base, tuned, out, **OPTIONS)
    monkeypatch.undo()
    victim = journal_entries(tmp_path)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of a factor: its digest no longer matches
    victim.write_bytes(bytes(data))
    summary = lorasurgeon.extract(base, tuned, out, resume=True, **OPTIONS)
    assert summary.work is not None and summary.work.resumed == 3
    assert (out / ADAPTER).read_bytes() == reference

    same = shutil.copytree(base, tmp_path / "same")
    with pytest.raises(LorasurgeonError, match="nothing to extract"):  # the inputs' fault: no journal is kept
        lorasurgeon.extract(base, same, tmp_path / "x", **OPTIONS)
    assert temporaries(tmp_path) == []


def test_cluster_without_ray_and_unknown_engines_are_refused(
    pair: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned, _ = pair
    with pytest.raises(LorasurgeonError, match=r"cluster='dask'.*only engine is Ray"):
        lorasurgeon.extract(base, tuned, tmp_path / "x", cluster="dask", **OPTIONS)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where the extra is not installed
    with pytest.raises(UnsupportedError, match=r"lorasurgeon\[ray\]"):
        lorasurgeon.extract(base, tuned, tmp_path / "x", cluster="ray", **OPTIONS)
    assert not (tmp_path / "x").exists() and temporaries(tmp_path) == []


# --- on a local Ray cluster ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_extract_is_bit_identical_to_the_local_run(
    ray_cluster: str, pair: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    base, tuned, reference = pair
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", cluster="ray", **OPTIONS)
    assert (tmp_path / "lora" / ADAPTER).read_bytes() == reference
    work = summary.work
    assert work is not None and work.engine == "ray" and work.steps == MATRICES and work.retried == 0
    assert len(work.nodes) == 1 and work.nodes[0].node != "local"
    local = lorasurgeon.extract(base, tuned, tmp_path / "local", **OPTIONS)
    assert local.work is not None and local.work.engine == "local"
    assert [m.spectrum for m in summary.matrices] == [m.spectrum for m in local.matrices]


@pytest.mark.slow
def test_more_threads_than_any_node_has_cores_still_run(
    ray_cluster: str, pair: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    """--threads 4 on nodes of 2 CPUs: each task asks Ray for 2 (asking for 4 would wait for ever) and still runs
    4 torch threads, so the adapter is the local --threads 4 run's."""
    base, tuned, _ = pair
    options = {**OPTIONS, "threads": 4}
    local = lorasurgeon.extract(base, tuned, tmp_path / "local", **options)
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", cluster="ray", **options)
    assert summary.work is not None and summary.work.engine == "ray" and summary.work.steps == MATRICES
    assert (tmp_path / "lora" / ADAPTER).read_bytes() == (tmp_path / "local" / ADAPTER).read_bytes()
    assert [m.spectrum for m in summary.matrices] == [m.spectrum for m in local.matrices]


@pytest.mark.slow
def test_killed_worker_is_retried_with_the_same_result(
    ray_cluster: str, pair: tuple[Path, Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned, reference = pair
    victim = KilledOnce(
        run_matrix_task, attrgetter("tuned.name"), "model.layers.1.mlp.up_proj.weight", tmp_path / "pid"
    )
    monkeypatch.setattr(extract_steps, "run_matrix_task", victim)
    thread, killed = kill_when_marked(victim.mark)
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", cluster="ray", **OPTIONS)
    thread.join(5)
    assert killed and killed[0] != os.getpid()
    assert summary.work is not None and summary.work.retried == 1 and summary.work.steps == MATRICES
    assert (tmp_path / "lora" / ADAPTER).read_bytes() == reference


# The driver in its own process, each task held back 0.4 s so it can be killed with work in flight.
SLOW_DRIVER = """
import sys, time
from lorasurgeon import extract_steps
from lorasurgeon.cli import main
from lorasurgeon.matrix_task import run_matrix_task
def slow(task):
    time.sleep(0.4)
    return run_matrix_task(task)
extract_steps.run_matrix_task = slow
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_killed_driver_leaves_no_output_and_resume_completes(
    ray_cluster: str, pair: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    base, tuned, reference = pair
    out = tmp_path / "lora"
    args = ["extract", base, tuned, "-o", out, "--rank", "4", "--method", "randomized", "--threads", "1"]
    command = [sys.executable, "-c", SLOW_DRIVER, *map(str, args), "--cluster", f"ray:{ray_cluster}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(journal_entries(tmp_path)) < 4 and time.monotonic() < deadline:
        assert driver.poll() is None, driver.communicate()
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    kept = len(journal_entries(tmp_path))
    assert driver.returncode == -signal.SIGKILL and not out.exists()
    assert 4 <= kept < MATRICES

    summary = lorasurgeon.extract(base, tuned, out, cluster="ray", resume=True, **OPTIONS)
    assert summary.work is not None and summary.work.resumed == kept and summary.work.steps == MATRICES - kept
    assert summary.resumed_from is not None and TMP_MARK in summary.resumed_from
    assert (out / ADAPTER).read_bytes() == reference
    assert temporaries(tmp_path) == []
