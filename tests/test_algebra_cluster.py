"""resize and combine as one task per module (issue 17): on a Ray cluster and resumed after an interruption, the
same bytes as the plain local run, whatever fails.

The oracle is lorasurgeon's own plain local run (no --cluster, no --resume): a cluster run and a resumed run must
write the same OUT, byte for byte. Tests that need no Ray run first and skip
nothing when Ray is missing; one local Ray instance (2 CPUs) serves the rest.
"""

from __future__ import annotations

import json
import os
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import run_cli, save_adapter
from killing import KilledOnce, kill_when_marked

import lorasurgeon
from lorasurgeon import algebra_steps
from lorasurgeon.algebra_task import AlgebraTask, ModuleOutcome, run_algebra_task
from lorasurgeon.errors import LorasurgeonError, UnsupportedError
from lorasurgeon.extraction import JOURNAL
from lorasurgeon.writer import TMP_MARK

ADAPTER = "adapter_model.safetensors"
MODULES = 2 * 7  # two layers, seven projections


def written(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if TMP_MARK in p.name)


def journal_entries(folder: Path) -> list[Path]:
    return [p for tmp in temporaries(folder) for p in (tmp / JOURNAL).glob("*.safetensors")]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, rich: Path, partial: Path) -> dict[str, dict[str, bytes]]:
    """The plain local runs' OUT, by case."""
    root = tmp_path_factory.mktemp("references")
    out = {}
    for name, run in CASES.items():
        run(rich, partial, root / name, {})
        out[name] = written(root / name)
    return out


def _resize_rank(rich: Path, partial: Path, out: Path, extra: dict[str, Any]) -> Any:
    return lorasurgeon.resize(rich, out, rank=3, **extra)


def _resize_energy(rich: Path, partial: Path, out: Path, extra: dict[str, Any]) -> Any:
    return lorasurgeon.resize(rich, out, energy=0.8, **extra)


def _combine_svd(rich: Path, partial: Path, out: Path, extra: dict[str, Any]) -> Any:
    return lorasurgeon.combine([rich, partial], out, weights=[120, 80], mean=True, rank=3, report_naive=True, **extra)


def _combine_dare(rich: Path, partial: Path, out: Path, extra: dict[str, Any]) -> Any:
    return lorasurgeon.combine([rich, partial], out, method="dare_ties", density=0.5, seed=5, rank=4, **extra)


CASES = {"resize_rank": _resize_rank, "resize_energy": _resize_energy, "combine_svd": _combine_svd}
CASES["combine_dare"] = _combine_dare


class Interrupted(KeyboardInterrupt):
    pass


def interrupt_after(count: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The task function, interrupted (as by ^C) when it is called for the module after `count`; returns the
    names of the modules it was called for."""
    calls: list[str] = []

    def task(t: AlgebraTask) -> ModuleOutcome:
        calls.append(t.job.name)
        if len(calls) > count:
            raise Interrupted
        return run_algebra_task(t)

    monkeypatch.setattr(algebra_steps, "run_algebra_task", task)
    return calls


@pytest.mark.parametrize("case", ["resize_rank", "combine_svd", "combine_dare"])
def test_interrupted_run_resumes_where_it_stopped(
    case: str, rich: Path, partial: Path, references: dict[str, dict[str, bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    interrupt_after(MODULES - 3, monkeypatch)
    with pytest.raises(Interrupted):  # a plain run keeps its journal too
        CASES[case](rich, partial, out, {})
    assert not out.exists()
    assert len(journal_entries(tmp_path)) == MODULES - 3
    monkeypatch.undo()
    calls = interrupt_after(MODULES, monkeypatch)  # counts what the resumed run computes
    summary = CASES[case](rich, partial, out, {"resume": True})
    assert len(calls) == 3 and summary.work.resumed == MODULES - 3 and summary.work.steps == 3
    assert summary.resumed_from is not None and TMP_MARK in summary.resumed_from
    assert written(out) == references[case]
    assert temporaries(tmp_path) == [] and not (out / JOURNAL).exists()


def test_a_changed_input_is_never_mixed_in(
    rich: Path, partial: Path, references: dict[str, dict[str, bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, llama_dir: Path,
) -> None:  # fmt: skip
    other = save_adapter(llama_dir, tmp_path / "other", seed=9, r=2, lora_alpha=3, target_modules=["q_proj"])
    client = tmp_path / "client" / "lora"  # named as `partial` is: OUT's metadata names the adapters
    client.mkdir(parents=True)
    for name in ("adapter_config.json", ADAPTER):
        (client / name).write_bytes((other / name).read_bytes())
    out = tmp_path / "out"
    interrupt_after(5, monkeypatch)
    with pytest.raises(Interrupted):
        _combine_svd(rich, client, out, {"resume": True})
    monkeypatch.undo()
    assert len(journal_entries(tmp_path)) == 5
    for name in ("adapter_config.json", ADAPTER):  # the client rewritten in place with `partial`'s values
        (client / name).write_bytes((partial / name).read_bytes())
    os.utime(client / ADAPTER, ns=(1, 1))  # its mtime differs from the interrupted run's for certain
    summary = _combine_svd(rich, client, out, {"resume": True})
    resumed = summary.work.resumed
    assert 0 < resumed < 5  # modules reading only `rich` were kept; none that read the client
    assert summary.work.steps == MODULES - resumed
    assert written(out) == references["combine_svd"]


def test_what_a_task_cannot_express_is_refused_by_name(rich: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=r"cluster='ray' with params=3000: one parameter budget"):
        lorasurgeon.resize(rich, tmp_path / "x", params=3000, cluster="ray")
    with pytest.raises(LorasurgeonError, match=r"cluster='dask'.*only engine is Ray"):
        lorasurgeon.resize(rich, tmp_path / "x", rank=3, cluster="dask")
    with pytest.raises(LorasurgeonError, match=r"threads=0: must be at least 1"):
        lorasurgeon.combine([rich], tmp_path / "x", rank=3, threads=0)
    assert not (tmp_path / "x").exists() and temporaries(tmp_path) == []


def test_resume_into_a_one_file_output_is_refused(rich: Path, tmp_path: Path) -> None:
    kohya = tmp_path / "kohya.safetensors"
    lorasurgeon.convert(rich, kohya, to="kohya", component="lora_unet")
    out = tmp_path / "x.safetensors"
    with pytest.raises(UnsupportedError, match=r"resume=True: keeps the computed modules .* kohya OUT is one file"):
        lorasurgeon.resize(kohya, out, rank=3, resume=True)
    assert not out.exists() and temporaries(tmp_path) == []
    summary = lorasurgeon.resize(kohya, out, rank=3, threads=1)  # tasks without a journal: a one-file OUT is fine
    assert summary.work is not None and summary.work.steps == MODULES and out.is_file()


def test_params_resumes_with_the_budgets_ranks(rich: Path, tmp_path: Path) -> None:
    reference = lorasurgeon.resize(rich, tmp_path / "ref", params=3000)
    summary = lorasurgeon.resize(rich, tmp_path / "out", params=3000, resume=True)
    assert summary.work is not None and summary.work.steps == MODULES
    assert written(tmp_path / "out") == written(tmp_path / "ref")
    assert [m.row for m in summary.modules] == [m.row for m in reference.modules]
    assert len({m.row.new_rank for m in summary.modules}) > 1  # the budget chose different ranks: not a no-op


def test_cli_takes_the_flags_and_refuses_in_one_line(
    rich: Path, references: dict[str, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["resize", str(rich), "--rank", "3", "--resume", "-o", str(out), "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 0 and doc["work"]["engine"] == "local" and doc["work"]["steps_run"] == MODULES
    assert written(out) == references["resize_rank"]
    args = ["resize", str(rich), "--params", "3000", "--cluster", "ray", "-o", str(tmp_path / "x")]
    code, _, stderr = run_cli(args, capsys)
    assert code == 2 and stderr.count("Error:") == 1 and "--cluster ray with --params 3000" in stderr


# --- on a local Ray cluster ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_cluster_run_is_bit_identical_to_the_local_run(
    ray_cluster: str, case: str, rich: Path, partial: Path, references: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    threads = torch.get_num_threads()  # the local run's, which the tasks carry by default
    summary = CASES[case](rich, partial, tmp_path / "out", {"cluster": "ray"})
    assert written(tmp_path / "out") == references[case]
    work = summary.work
    assert work is not None and work.engine == "ray" and work.steps == MODULES and work.retried == 0
    assert len(work.nodes) == 1 and work.nodes[0].node != "local" and threads >= 1
    assert summary.modules[0].row.new_rank < summary.modules[0].row.old_rank  # it did cut ranks


@pytest.mark.slow
def test_cluster_json_carries_the_work_report(ray_cluster: str, rich: Path, tmp_path: Path) -> None:
    from lorasurgeon.adapter_documents import algebra_doc

    doc = algebra_doc(lorasurgeon.resize(rich, tmp_path / "out", rank=3, cluster="ray"))
    assert doc["work"]["engine"] == "ray" and doc["work"]["steps_run"] == MODULES and doc["work"]["resumed"] == 0
    assert sum(n["steps"] for n in doc["work"]["nodes"]) == MODULES


@pytest.mark.slow
def test_a_local_run_interrupted_resumes_on_the_cluster(
    ray_cluster: str, rich: Path, partial: Path, references: dict[str, dict[str, bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    interrupt_after(6, monkeypatch)
    with pytest.raises(Interrupted):
        _combine_svd(rich, partial, out, {"resume": True})
    monkeypatch.undo()
    summary = _combine_svd(rich, partial, out, {"resume": True, "cluster": "ray"})
    assert summary.work.engine == "ray" and summary.work.resumed == 6 and summary.work.steps == MODULES - 6
    assert written(out) == references["combine_svd"]


@pytest.mark.slow
def test_killed_worker_is_retried_with_the_same_result(
    ray_cluster: str, rich: Path, partial: Path, references: dict[str, dict[str, bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    victim = KilledOnce(run_algebra_task, attrgetter("job.name"), "model.layers.1.mlp.up_proj", tmp_path / "pid")
    monkeypatch.setattr(algebra_steps, "run_algebra_task", victim)
    thread, killed = kill_when_marked(victim.mark)
    summary = _combine_svd(rich, partial, tmp_path / "out", {"cluster": "ray"})
    thread.join(5)
    assert killed and killed[0] != os.getpid()
    assert summary.work.retried == 1 and summary.work.steps == MODULES
    assert written(tmp_path / "out") == references["combine_svd"]
