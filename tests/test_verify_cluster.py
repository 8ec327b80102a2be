"""verify on a Ray cluster and resumed after an interruption (issue 17): the same verdicts as the local run.

The oracle is lorasurgeon's own local verify (the path every other verify test checks against PEFT): a cluster run
and a resumed run must give the same --json document, timings and the work report aside, both for a correct merge
(exit 0, every tensor exact) and for a merge at scale 0.5 (exit 1, the same 14 wrong-scale problems). An interrupted
run is simulated by a task that raises after N tensors; a changed input between the runs is never mixed in. Tests
that need no Ray run first; one local Ray instance (2 CPUs) serves the rest of the module.
"""

from __future__ import annotations

import json
import os
import pickle
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
from builders import run_cli
from killing import KilledOnce, kill_when_marked

import lorasurgeon
from lorasurgeon import verify_steps
from lorasurgeon.errors import InputError, LorasurgeonError, UnsupportedError
from lorasurgeon.verdict import Verdict
from lorasurgeon.verify_steps import JOURNAL_PREFIX
from lorasurgeon.verify_task import VerifyTask, run_verify_task

TENSORS_CHANGED = 14  # 7 projections x 2 layers


@pytest.fixture(scope="module")
def merges(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, llama_adapter: Path) -> dict[str, Path]:
    """A correct merge and one at scale 0.5, each in its own folder (so their journals are side by side)."""
    root = tmp_path_factory.mktemp("merges")
    good, half = root / "good" / "merged", root / "half" / "merged"
    good.parent.mkdir()
    half.parent.mkdir()
    lorasurgeon.merge(llama_dir, [llama_adapter], good)
    lorasurgeon.merge(llama_dir, [llama_adapter], half, scale=0.5)
    return {"good": good, "half": half}


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """The --json document without what differs between runs of the same verify: timings, where the work went."""
    return {k: v for k, v in doc.items() if k not in ("seconds", "work", "resumed_from")}


def verify_json(capsys: pytest.CaptureFixture[str], merged: Path, base: Path, adapter: Path, *extra: str) -> Any:
    code, out, _ = run_cli(["verify", str(merged), "--base", str(base), str(adapter), "--json", *extra], capsys)
    return code, json.loads(out)


def journals(merged: Path) -> list[Path]:
    return sorted(merged.parent.glob(f"{JOURNAL_PREFIX}*"))


class Interrupted(Exception):
    """Stands for ^C or a killed driver: not one of lorasurgeon's errors, so the journal is kept."""


class Interrupter:
    """Replaces the local engine's task: computes tensors (naming each in `computed`) and raises Interrupted once
    `count` are done, until `stop()`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
        self.count, self.computed, self.interrupting = count, list[str](), True
        self.tasks: list[VerifyTask] = []
        monkeypatch.setattr(verify_steps, "run_verify_task", self)

    def __call__(self, task: VerifyTask) -> Verdict:
        if self.interrupting and len(self.computed) >= self.count:
            raise Interrupted
        self.computed.append(task.merged.name)
        self.tasks.append(task)
        return run_verify_task(task)

    def stop(self) -> None:
        self.interrupting = False


# --- without Ray -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "code"), [("good", 0), ("half", 1)])
def test_resumed_verify_gives_the_local_verdicts_and_computes_only_the_rest(
    which: str,
    code: int,
    merges: dict[str, Path],
    llama_dir: Path,
    llama_adapter: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    merged = merges[which]
    local_code, local = verify_json(capsys, merged, llama_dir, llama_adapter)
    assert local_code == code and local["work"] is None and len(local["problems"]) == (TENSORS_CHANGED if code else 0)
    task = Interrupter(monkeypatch, 5)
    with pytest.raises(Interrupted):
        lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    assert len(task.computed) == 5 and len(journals(merged)) == 1  # the verdicts so far are kept
    assert len(list(journals(merged)[0].glob("*.safetensors"))) == 5
    task.stop()
    resumed_code, resumed = verify_json(capsys, merged, llama_dir, llama_adapter, "--resume")
    assert resumed_code == code and comparable(resumed) == comparable(local)
    total = len(local["tensors"])
    assert len(task.computed) == total and len(set(task.computed)) == total  # the 5 kept were not computed again
    assert resumed["work"]["resumed"] == 5 and resumed["work"]["steps_run"] == total - 5
    assert resumed["work"]["engine"] == "local" and resumed["resumed_from"] is not None
    assert journals(merged) == []  # a completed run removes its journal


def test_a_changed_input_is_recomputed_never_mixed_in(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted on a correct merge, then MERGED replaced by a scale-0.5 merge: the resumed run takes no verdict of
    the old file, and finds what a fresh verify of the new one finds."""
    merged = tmp_path / "merged"
    lorasurgeon.merge(llama_dir, [llama_adapter], merged)
    task = Interrupter(monkeypatch, 6)
    with pytest.raises(Interrupted):
        lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    assert len(journals(merged)) == 1
    lorasurgeon.merge(llama_dir, [llama_adapter], merged, scale=0.5, force=True)
    task.stop()
    task.computed.clear()
    resumed = lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    fresh = lorasurgeon.verify(merged, llama_dir, [llama_adapter])
    assert resumed.work is not None and resumed.work.resumed == 0  # every kept verdict was of the old MERGED
    assert len(task.computed) == len(fresh.tensors) - sum(t.kind == "extra" for t in fresh.tensors)
    assert not resumed.ok and [(t.name, t.kind, t.verdict) for t in resumed.tensors] == [
        (t.name, t.kind, t.verdict) for t in fresh.tensors
    ]
    assert len(resumed.problems) == TENSORS_CHANGED and journals(merged) == []


def test_without_resume_a_kept_journal_is_started_afresh(
    merges: dict[str, Path], llama_dir: Path, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = merges["good"]
    task = Interrupter(monkeypatch, 3)
    with pytest.raises(Interrupted):
        lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    task.stop()
    task.computed.clear()
    again = lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=False, cluster=None)
    assert again.work is None and task.computed == []  # plain local verify: as before, no tasks, no journal read
    assert len(journals(merged)) == 1  # and it leaves an interrupted run's journal alone
    resumed = lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    assert resumed.ok and resumed.work is not None and resumed.work.resumed == 3 and journals(merged) == []


def test_a_task_is_plain_data_and_refuses_a_file_changed_since_planning(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task pickled and run elsewhere gives the same verdict; a file touched after planning is refused by name."""
    merged = tmp_path / "merged"
    lorasurgeon.merge(llama_dir, [llama_adapter], merged)
    task = Interrupter(monkeypatch, 10**6)  # never interrupts: it keeps the tasks
    summary = lorasurgeon.verify(merged, llama_dir, [llama_adapter], resume=True)
    [q0] = [t for t in task.tasks if t.merged.name == "model.layers.0.self_attn.q_proj.weight"]
    copy = pickle.loads(pickle.dumps(q0))
    assert (
        copy == q0
        and copy.step.terms
        and run_verify_task(copy) == next(t.verdict for t in summary.tensors if t.name == q0.merged.name)
    )
    assert {p for p, _ in q0.stamps} == {str(merged / "model.safetensors"), str(llama_dir / "model.safetensors")} | {
        str(llama_adapter / "adapter_model.safetensors")
    }
    stat = (merged / "model.safetensors").stat()
    os.utime(merged / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match=r"merged/model\.safetensors: is not the file the verify was planned from"):
        run_verify_task(copy)


def test_a_bad_cluster_spec_is_one_clear_error(
    merges: dict[str, Path], llama_dir: Path, llama_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LorasurgeonError, match=r"cluster='dask'.*only engine is Ray"):
        lorasurgeon.verify(merges["good"], llama_dir, [llama_adapter], cluster="dask")
    args = ["verify", str(merges["good"]), "--base", str(llama_dir), str(llama_adapter), "--cluster", "spark:x"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "" and "--cluster spark:x: expected ray or ray:ADDRESS" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert journals(merges["good"]) == []


def test_a_step_that_cannot_be_a_task_is_refused_by_name(tmp_path: Path) -> None:
    """An IA3 adapter (a tuner other than LoRA): --resume (and --cluster) refuse it naming the tensor and the kind,
    before any work; the local verify proves the same merge as before."""
    from tuner_cases import CASE, build

    built = build(CASE["ia3"], tmp_path)
    lorasurgeon.merge(built.base, [built.adapter], tmp_path / "merged")
    assert lorasurgeon.verify(tmp_path / "merged", built.base, [built.adapter]).ok
    with pytest.raises(UnsupportedError, match=r"proj\.weight is changed by a PEFT tuner other than LoRA.*resume=True"):
        lorasurgeon.verify(tmp_path / "merged", built.base, [built.adapter], resume=True)
    assert journals(tmp_path / "merged") == []


# --- on a local Ray cluster ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("which", "code"), [("good", 0), ("half", 1)])
def test_cluster_verify_gives_the_local_verdicts(
    which: str,
    code: int,
    ray_cluster: str,
    merges: dict[str, Path],
    llama_dir: Path,
    llama_adapter: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = Path(os.path.commonpath([merges[which], llama_dir, llama_adapter]))
    monkeypatch.chdir(root)  # relative paths: a worker's cwd is not the driver's, the tasks' paths are absolute
    merged, base, adapter = (p.relative_to(root) for p in (merges[which], llama_dir, llama_adapter))
    local_code, local = verify_json(capsys, merged, base, adapter)
    ray_code, on_ray = verify_json(capsys, merged, base, adapter, "--cluster", "ray")
    assert ray_code == local_code == code and comparable(on_ray) == comparable(local)
    assert len(local["problems"]) == (TENSORS_CHANGED if code else 0)  # the scale-0.5 merge is caught on Ray too
    if code:
        assert {t["verdict"] for t in on_ray["tensors"] if t["adapters"]} == {"wrong scale"}
    else:
        assert {t["verdict"] for t in on_ray["tensors"]} == {"exact"}
    work = on_ray["work"]
    total = len(local["tensors"])
    assert work["engine"] == "ray" and work["steps_run"] == total and work["retried"] == 0 and work["resumed"] == 0
    assert len(work["nodes"]) == 1 and work["nodes"][0]["node"] != "local"
    assert journals(merges[which]) == [] and local["merged"] == on_ray["merged"] == str(merged)


@pytest.mark.slow
def test_killed_worker_is_retried_with_the_same_verdicts(
    ray_cluster: str,
    merges: dict[str, Path],
    llama_dir: Path,
    llama_adapter: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdicts are the local run's, and stdout is the --json document alone: Ray's driver prints the raylet's
    "A worker died ..." to stdout."""
    code, local = verify_json(capsys, merges["half"], llama_dir, llama_adapter)
    victim = KilledOnce(
        run_verify_task, attrgetter("merged.name"), "model.layers.1.mlp.up_proj.weight", tmp_path / "pid"
    )
    monkeypatch.setattr(verify_steps, "run_verify_task", victim)
    thread, killed = kill_when_marked(victim.mark)
    ray_code, on_ray = verify_json(capsys, merges["half"], llama_dir, llama_adapter, "--cluster", "ray")
    thread.join(5)
    assert killed and killed[0] != os.getpid()
    assert ray_code == code == 1 and comparable(on_ray) == comparable(local)
    assert on_ray["work"]["retried"] == 1 and on_ray["work"]["steps_run"] == len(local["tensors"])
    assert [t["verdict"] for t in on_ray["tensors"] if t["name"] == victim.victim] == ["wrong scale"]
