"""Models as the Hugging Face Hub cache holds them, built offline in huggingface_hub's documented layout.

`<cache>/models--org--name/` holds `blobs/<sha256>` (the bytes), `snapshots/<commit>/<file>` (relative links
into blobs/) and `refs/<branch or tag>` (the commit). huggingface_hub's own scan_cache_dir and
try_to_load_from_cache confirm that every cache built here is one it recognises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from builders import read_tensors, run_cli, tree_hashes
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from safetensors import safe_open

import lorasurgeon
from lorasurgeon import hub
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError

MAIN, TAGGED = "1" * 40, "2" * 40


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file under `source` into the cache as revision `commit` (named by `refs`); the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # ../../blobs/<sha256>, as huggingface_hub links
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, llama_adapter: Path) -> Path:
    """org/tiny at main (the tiny Llama) and at tag v1 (sharded, other weights), org/tiny-lora (its adapter)."""
    from builders import save_model

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    cache_repo(cache, "org/tiny", llama_dir, MAIN)
    sharded = save_model(root / "sharded", max_shard_size="40KB", seed=3)
    cache_repo(cache, "org/tiny", sharded, TAGGED, refs=("v1",))
    cache_repo(cache, "org/tiny-lora", llama_adapter, MAIN)
    return cache


def test_the_cache_built_here_is_one_huggingface_hub_recognises(cache: Path) -> None:
    info = scan_cache_dir(cache)
    assert info.warnings == []
    repos = {r.repo_id: r for r in info.repos}
    assert {rev.commit_hash for rev in repos["org/tiny"].revisions} == {MAIN, TAGGED}
    assert {f.file_name for rev in repos["org/tiny-lora"].revisions for f in rev.files} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    found = try_to_load_from_cache("org/tiny", "config.json", cache_dir=cache, revision="v1")
    assert isinstance(found, str) and Path(found).parent.name == TAGGED


@pytest.mark.parametrize(
    ("spec", "commit"),
    [("org/tiny", MAIN), ("org/tiny@main", MAIN), ("org/tiny@v1", TAGGED), (f"org/tiny@{TAGGED}", TAGGED)],
)
def test_resolve_finds_a_repo_id_in_the_cache_offline(cache: Path, spec: str, commit: str) -> None:
    snapshot = hub.resolve(spec, download=False, cache_dir=cache)
    assert snapshot == cache / "models--org--tiny" / "snapshots" / commit
    revision = spec.partition("@")[2] or None
    assert Path(str(try_to_load_from_cache("org/tiny", "config.json", cache_dir=cache, revision=revision))).parent == (
        snapshot
    )


def test_resolve_uses_the_default_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert hub.resolve("org/tiny-lora", download=False) == cache / "models--org--tiny-lora" / "snapshots" / MAIN


def test_a_local_path_comes_first(cache: Path, work: Path) -> None:
    (work / "org" / "tiny").mkdir(parents=True)
    assert hub.resolve("org/tiny", download=False, cache_dir=cache) == Path("org/tiny")


def test_a_repo_not_in_the_cache_is_one_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hub.DOWNLOAD_ENV, raising=False)
    for spec in ("org/absent", "org/tiny@no-such-branch"):
        with pytest.raises(InputError, match=f"^{spec}: .*not in the local Hugging Face cache; pass --download"):
            hub.resolve(spec, download=False, cache_dir=cache)
    for spec in ("absent", "a/b/c", "org/tiny@", "../x", ".cache/x"):
        with pytest.raises(InputError, match=f"^{re.escape(spec)}: no such file or directory$"):
            hub.resolve(spec, download=False, cache_dir=cache)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_a_download_is_tried_only_when_allowed(
    cache: Path, monkeypatch: pytest.MonkeyPatch, how: str, tmp_path: Path
) -> None:
    """Offline (HF_HUB_OFFLINE), an allowed download reaches huggingface_hub's download path and fails there,
    naming the repo; without permission the message is the cache's (above), and nothing is attempted."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if how == "environment":
        monkeypatch.setenv(hub.DOWNLOAD_ENV, "1")
    with pytest.raises(InputError, match=r"^org/absent: cannot download from the Hugging Face Hub: ") as error:
        hub.resolve("org/absent", download=how == "flag", cache_dir=tmp_path / "empty")
    assert "pass --download" not in str(error.value)
    assert not (tmp_path / "empty" / "models--org--absent" / "snapshots").exists()


@pytest.mark.parametrize("revision", [MAIN, TAGGED], ids=["file", "index"])
def test_a_snapshot_opens_as_a_checkpoint_through_its_blob_links(cache: Path, revision: str) -> None:
    """Every command refused these ("points outside the checkpoint directory"): each file is a link to
    ../../blobs/<sha256>."""
    snapshot = cache / "models--org--tiny" / "snapshots" / revision
    assert (snapshot / "config.json").is_symlink()
    expected = read_tensors(snapshot)
    for path in (snapshot, *sorted(snapshot.glob("*.safetensors*"))):
        with Checkpoint.open(path) as ckpt:
            assert set(ckpt.tensors) == set(expected) or ckpt.layout == "file"
            for name, info in ckpt.tensors.items():
                assert torch.equal(ckpt.read(info), expected[name])
                assert info.path.parent == snapshot  # named by the snapshot, read through the link
            if path == snapshot:
                assert ckpt.config is not None and ckpt.config["model_type"] == "llama"


def test_merge_and_check_read_models_and_adapters_in_the_cache(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = hub.resolve("org/tiny", download=False, cache_dir=cache)
    adapter = hub.resolve("org/tiny-lora", download=False, cache_dir=cache)
    before = tree_hashes(cache)
    plan = lorasurgeon.check(base, [adapter])
    assert not plan.errors and len(plan.steps) > 0
    out = tmp_path / "merged"
    code, _, stderr = run_cli(["merge", str(base), str(adapter), "-o", str(out)], capsys)
    assert code == 0, stderr
    merged, original = read_tensors(out), read_tensors(base)
    changed = [n for n in merged if not torch.equal(merged[n], original[n])]
    assert changed and set(merged) == set(original)
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(original)
    assert tree_hashes(cache) == before


def test_every_command_takes_repo_ids_and_names_out_after_the_repo(
    cache: Path, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the command line a repo id is an input like a path; the default OUT is named after the repository
    (tiny-merged), never the snapshot's commit hash."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    before = tree_hashes(cache)
    code, _, stderr = run_cli(["merge", "org/tiny", "org/tiny-lora"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in work.iterdir()) == ["tiny-merged"]
    merged, original = (
        read_tensors(work / "tiny-merged"),
        read_tensors(cache / "models--org--tiny" / "snapshots" / MAIN),
    )
    assert set(merged) == set(original) and any(not torch.equal(merged[n], original[n]) for n in merged)
    for args in (["check", "org/tiny@v1", "org/tiny-lora"], ["report", "org/tiny-lora"], ["report", "org/tiny@v1"]):
        code, _, stderr = run_cli(args, capsys)
        assert code == 0, (args, stderr)
    code, _, stderr = run_cli(["verify", "tiny-merged", "--base", "org/tiny", "org/tiny-lora"], capsys)
    assert code == 0, stderr
    assert tree_hashes(cache) == before


def test_download_is_a_flag_of_every_command(
    cache: Path, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(hub.DOWNLOAD_ENV, "0")  # restored afterwards: --download sets it for the process
    code, _, stderr = run_cli(["check", "org/absent", "org/tiny-lora"], capsys)
    assert code == 2 and "not in the local Hugging Face cache; pass --download" in stderr, stderr
    for args in (["--download", "check", "org/absent", "org/tiny-lora"], ["check", "org/absent", "x", "--download"]):
        code, _, stderr = run_cli(args, capsys)
        (error,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
        assert code == 2 and error.startswith("Error: org/absent: cannot download from the Hugging Face Hub"), stderr
    assert "Traceback" not in stderr and list(work.iterdir()) == []


def _fake_snapshot(root: Path, folder: str, llama_dir: Path) -> Path:
    """A Hub-like layout under `root/folder`, its model.safetensors linked into `blobs/` by a relative link."""
    repo = root / folder
    (repo / "blobs").mkdir(parents=True)
    shutil.copyfile(llama_dir / "model.safetensors", repo / "blobs" / "abc")
    snapshot = repo / "snapshots" / MAIN
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to("../../blobs/abc")
    return snapshot


def test_links_are_followed_only_into_the_same_repos_blobs(tmp_path: Path, llama_dir: Path, cache: Path) -> None:
    followed = _fake_snapshot(tmp_path, "models--org--x", llama_dir)
    with Checkpoint.open(followed) as ckpt:
        assert len(ckpt.tensors) > 0
    # No Hub repository folder above `snapshots`: an ordinary directory, whose links must stay inside it.
    plain = _fake_snapshot(tmp_path, "some-folder", llama_dir)
    with pytest.raises(InputError, match="points outside the checkpoint directory"):
        Checkpoint.open(plain)
    # Another repository's blobs, and a file anywhere else, are outside too.
    other = cache / "models--org--tiny-lora" / "blobs"
    elsewhere = tmp_path / "models--org--y" / "snapshots" / MAIN
    elsewhere.mkdir(parents=True)
    (tmp_path / "models--org--y" / "blobs").mkdir()
    blob = next(p for p in other.iterdir() if p.stat().st_size > 1000)
    (elsewhere / "model.safetensors").symlink_to(blob)
    with pytest.raises(InputError, match=r"points outside the checkpoint directory .* or its Hub cache blobs"):
        Checkpoint.open(elsewhere)


def test_index_names_may_not_escape_even_into_the_blobs(cache: Path, tmp_path: Path) -> None:
    """The link rule is for links; a shard *name* that leaves the directory is refused, wherever it lands."""
    source = cache / "models--org--tiny" / "snapshots" / TAGGED
    repo = tmp_path / "models--org--z"
    shutil.copytree(cache / "models--org--tiny", repo, symlinks=True)
    snapshot = repo / "snapshots" / TAGGED
    index_path = snapshot / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    blob_name = os.readlink(snapshot / shard).split("/")[-1]
    index["weight_map"] = {k: f"../../blobs/{blob_name}" if v == shard else v for k, v in index["weight_map"].items()}
    index_path.unlink()
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="points outside the checkpoint directory"):
        Checkpoint.open(snapshot)
    assert source.is_dir()
