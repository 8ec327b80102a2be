"""Reading every checkpoint layout, writing safetensors ourselves, and publishing atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from builders import metadata_of, read_tensors, run_cli, save_model
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, OutputError
from lorasurgeon.layout import companion_files
from lorasurgeon.temporaries import remove
from lorasurgeon.writer import CheckpointWriter


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("sharded") / "base", dtype=torch.bfloat16, max_shard_size="40KB")


@pytest.mark.parametrize("which", ["dir", "index", "file"])
def test_every_layout_reads_what_safetensors_reads(sharded: Path, llama_dir: Path, which: str) -> None:
    path = {"dir": sharded, "index": sharded / "model.safetensors.index.json", "file": llama_dir / "model.safetensors"}[
        which
    ]
    expected = read_tensors(sharded if which != "file" else path)
    with Checkpoint.open(path) as ckpt:
        assert ckpt.layout == which
        assert set(ckpt.tensors) == set(expected)
        for name, info in ckpt.tensors.items():
            assert torch.equal(ckpt.read(info), expected[name]), name
        if which != "file":
            assert len(ckpt.shards) > 1 and ckpt.config is not None and ckpt.config["model_type"] == "llama"


def test_writer_output_is_read_by_safetensors_and_keeps_metadata(tmp_path: Path) -> None:
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.ones(5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "pt", "note": "kept"})
    out = tmp_path / "out.safetensors"
    with Checkpoint.open(tmp_path / "in.safetensors") as ckpt, CheckpointWriter(out, is_dir=False, inputs=[]) as w:
        infos = list(ckpt)
        entries = [(i.name, i.dtype, i.shape) for i in infos]
        with w.shard("out.safetensors", entries, {**ckpt.shards[0].header.metadata, "extra": "1"}) as stream:
            for info in infos:
                stream.copy_from(ckpt, info) if info.name != "b" else stream.write(ckpt.read(info) * 2)
    got = read_tensors(out)
    assert torch.equal(got["b"], tensors["b"] * 2) and torch.equal(got["a"], tensors["a"])
    assert got["empty"].shape == (0, 4) and got["scalar"].item() == 3
    assert metadata_of(out) == {"format": "pt", "note": "kept", "extra": "1"}
    assert int.from_bytes(out.read_bytes()[:8], "little") % 8 == 0  # padded to 8 bytes like the reference writer


def test_tensors_written_ahead_give_the_file_written_in_order(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((i + 1, 3), float(i)) for i in range(6)}
    entries = [(name, "F32", tuple(t.shape)) for name, t in tensors.items()]

    def write(out: Path, ahead_after: dict[str, list[str]]) -> bytes:
        with CheckpointWriter(out, is_dir=False, inputs=[]) as w, w.shard(out.name, entries, {}) as stream:
            for name, tensor in tensors.items():
                if stream.written_ahead(name):
                    stream.skip()
                else:
                    stream.write(tensor)
                for later in ahead_after.get(name, []):
                    assert stream.later(later)
                    stream.write_ahead(later, tensors[later])
                    assert stream.written_ahead(later) and not stream.later(later)
        return out.read_bytes()

    in_order = write(tmp_path / "a.safetensors", {})
    ahead = write(tmp_path / "b.safetensors", {"t0": ["t5", "t2"], "t1": ["t3"], "t3": ["t4"]})  # t5 first: a hole
    assert ahead == in_order and torch.equal(read_tensors(tmp_path / "b.safetensors")["t5"], tensors["t5"])
    with CheckpointWriter(tmp_path / "c", is_dir=False, inputs=[]) as w, w.shard("c", entries, {}) as stream:
        stream.write(tensors["t0"])
        stream.write_ahead("t2", tensors["t2"])
        for wrong in (
            lambda: stream.write_ahead("t0", tensors["t0"]),  # already written
            lambda: stream.write_ahead("t2", tensors["t2"]),  # twice
            lambda: stream.write_ahead("t3", tensors["t4"]),  # not its size
            lambda: stream.write_ahead("nope", tensors["t1"]),
            stream.skip,  # t1 was not written ahead
        ):
            with pytest.raises(RuntimeError, match="writer:"):
                wrong()
        stream.write(tensors["t1"])
        with pytest.raises(RuntimeError, match="does not match"):  # t2 is written already: only skip passes it
            stream.write(tensors["t2"])
        stream.skip()
        for name in ("t3", "t4", "t5"):
            stream.write(tensors[name])
    assert (tmp_path / "c").read_bytes() == in_order


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), CheckpointWriter(out, is_dir=True, inputs=[]) as w:
        w.write_json("config.json", {"a": 1})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        CheckpointWriter(out, is_dir=True, inputs=[])
    with pytest.raises(RuntimeError), CheckpointWriter(out, is_dir=True, inputs=[], force=True) as w:
        w.write_json("new.json", {})
        assert (out / "old.txt").read_text() == "old"  # still intact while the new one is built
        raise RuntimeError("interrupted")
    assert (out / "old.txt").read_text() == "old"
    with CheckpointWriter(out, is_dir=True, inputs=[], force=True) as w:
        w.write_json("new.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == [
        "new.json"
    ]


def test_merged_directory_mirrors_the_base(tmp_path: Path, sharded: Path, llama_dir: Path) -> None:
    from builders import save_adapter

    adapter = save_adapter(llama_dir, tmp_path / "lora", r=2)
    out = tmp_path / "merged"
    lorasurgeon.merge(sharded, [adapter], out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sharded.iterdir())
    index, base_index = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (out, sharded))
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in read_tensors(out).values())
    shard = out / sorted(set(index["weight_map"].values()))[0]
    record = json.loads(metadata_of(shard)["lorasurgeon"])
    assert record["operation"] == "merge" and record["adapters"] == ["lora"] and metadata_of(shard)["format"] == "pt"
    assert (out / "config.json").read_bytes() == (sharded / "config.json").read_bytes()


def test_untouched_tensors_are_copied_byte_for_byte(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "out")
    base, out = read_tensors(llama_dir), read_tensors(tmp_path / "out")
    untouched = [n for n in base if "proj" not in n]
    assert untouched and all(torch.equal(base[n], out[n]) for n in untouched)


def test_companions_are_copied_and_weights_of_other_formats_skipped(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    """Every non-weight file of BASE reaches OUT, nested ones included; weights in another file format (pickles,
    GGUF, TF, Flax, a stray safetensors) are left out and listed, since they would contradict the merged ones;
    hidden files and our own temporaries are neither."""
    import shutil

    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    companions = {"tokenizer.json": b"{}", "sub/dir/notes.txt": b"hello", "generation_config.json": b"{}"}
    others = ["pytorch_model.bin", "model.gguf", "tf_model.h5", "flax_model.msgpack", "sub/old.safetensors"]
    for rel in [*companions, *others, ".cache/x", ".out.lorasurgeon-tmp-1/y"]:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(companions.get(rel, b"\x80\x04junk"))
    summary = lorasurgeon.merge(base, [llama_adapter], tmp_path / "out")
    out = tmp_path / "out"
    assert all((out / rel).read_bytes() == data for rel, data in companions.items())
    assert sorted(summary.skipped_files) == sorted(others)
    assert not any((out / rel).exists() for rel in [*others, ".cache/x", ".out.lorasurgeon-tmp-1/y"])
    assert set(summary.copied_files) == {*companions, "config.json"}


# --- the header writer's bytes ------------------------------------------------------------------------------


def test_header_writer_golden_bytes() -> None:
    """Literal bytes, as safetensors' own serialization tests check theirs, and the same bytes its writer
    gives for the same tensors (compact JSON, __metadata__ first, raw UTF-8, spaces to a multiple of 8)."""
    from safetensors.torch import save

    from lorasurgeon.header import build_header

    text = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}'
    )
    expected = b"\x90\x00\x00\x00\x00\x00\x00\x00" + text + b" " * 6
    got = build_header([("a", "F32", (2,)), ("b", "U8", (3,))], {"format": "pt"})
    assert got == expected
    theirs = save({"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.uint8)}, metadata={"format": "pt"})
    assert theirs[: len(expected)] == expected
    accented = save({"é": torch.zeros(2)})  # not \u00e9: a reader's fast path need not decode escapes
    assert accented.startswith(build_header([("é", "F32", (2,))], {}))


def test_header_writer_refuses_what_no_reader_could_read(tmp_path: Path) -> None:
    from lorasurgeon.header import build_header

    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        build_header([("\ud800", "F32", (2,))], {})
    out = tmp_path / "out.safetensors"
    with (
        pytest.raises(OutputError, match=f"{out}: cannot write out.safetensors: .*surrogate"),
        CheckpointWriter(out, is_dir=False, inputs=[]) as w,
    ):
        w.shard("out.safetensors", [("a", "F32", (2,))], {"note": "\udc80"}).__enter__()
    assert list(tmp_path.iterdir()) == []


# --- only regular files, never a blocking read ---------------------------------------------------------------


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Fail (instead of hanging the run) when a test blocks for 20 s, e.g. on opening a named pipe."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_index_that_is_a_named_pipe_is_refused_not_waited_on(sharded: Path, tmp_path: Path, no_hang: None) -> None:
    base = Path(shutil.copytree(sharded, tmp_path / "base"))
    (base / "model.safetensors.index.json").unlink()
    os.mkfifo(base / "model.safetensors.index.json")
    with pytest.raises(InputError, match=r"model.safetensors.index.json: is a named pipe, not a regular file"):
        Checkpoint.open(base)


@pytest.mark.parametrize("name", ["config.json", "model-00001-of-00002.safetensors"])
def test_a_companion_or_shard_that_is_a_named_pipe_is_refused(
    sharded: Path, tmp_path: Path, name: str, no_hang: None
) -> None:
    base = Path(shutil.copytree(sharded, tmp_path / "base"))
    (base / name).unlink()
    os.mkfifo(base / name)
    with pytest.raises(InputError, match=rf"{name}: is a named pipe, not a regular file"):
        Checkpoint.open(base)


def test_a_device_named_on_the_command_line_is_refused(no_hang: None) -> None:
    with pytest.raises(InputError, match="/dev/zero: is a character device, not a regular file"):
        Checkpoint.open(Path("/dev/zero"))


@pytest.mark.parametrize("layout", ["file", "dir", "index"])
def test_a_symbolic_link_to_itself_is_one_clear_error(
    llama_dir: Path, sharded: Path, tmp_path: Path, layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if layout == "index":
        base = Path(shutil.copytree(sharded, tmp_path / "base"))
        loop = base / "model-00002-of-00002.safetensors"
        loop.unlink()
    else:
        base = tmp_path / "base"
        base.mkdir()
        loop = base / "model.safetensors"
    loop.symlink_to(loop.name)
    target = loop if layout == "file" else base
    code, _, stderr = run_cli(["report", str(target)], capsys)
    assert code == 2
    (error,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert str(loop) in error and "Too many levels of symbolic links" in error, error
    assert "internal error" not in error and "Traceback" not in stderr


def test_checkpoint_is_frozen(llama_dir: Path) -> None:
    with Checkpoint.open(llama_dir) as ckpt:
        with pytest.raises(dataclasses.FrozenInstanceError):
            ckpt.index_name = "x"  # type: ignore[misc]
        assert {ckpt: 1}[ckpt] == 1  # hashable, by identity


# --- shard names from an index --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("model-00001-of-00002.safetensors/", "is not a normalised relative path"),
        ("sub/../model-00001-of-00002.safetensors", "is not a normalised relative path"),
        ("./model-00001-of-00002.safetensors", "is not a normalised relative path"),
        ("sub//model-00001-of-00002.safetensors", "is not a normalised relative path"),
        ("../model-00001-of-00002.safetensors", "points outside the checkpoint directory"),
        ("/etc/passwd", "points outside the checkpoint directory"),
    ],
)
def test_shard_names_are_normalised_relative_paths(
    sharded: Path, tmp_path: Path, name: str, words: str, capsys: pytest.CaptureFixture[str], llama_adapter: Path
) -> None:
    """Refused when the index is opened, so check, report and merge agree (`sub/../x` passed check, then merge
    failed with a misleading "cannot write"; `x/` was written into OUT's index)."""
    base = Path(shutil.copytree(sharded, tmp_path / "base"))
    (base / "sub").mkdir()
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    real = index["weight_map"][first]
    index["weight_map"] = {k: name if v == real else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match=re.escape(f"{index_path}: shard name {name!r} {words}")):
        Checkpoint.open(base)
    for command in (["check", str(base), str(llama_adapter)], ["report", str(base)]):
        code, _, stderr = run_cli(command, capsys)
        assert code == 2 and words in stderr, stderr


# --- non-weight files: a walk without recursion, and the link rule -------------------------------------------


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied without recursion afterwards: pytest's own clean-up (shutil.rmtree) recurses once per
    level and fails on the 1,100-deep trees below."""
    yield tmp_path
    for child in tmp_path.iterdir():
        remove(child)


def test_companion_files_walk_a_tree_1100_folders_deep(deep: Path) -> None:
    tmp_path = deep
    root = tmp_path / "base"
    deep = root.joinpath(*["d"] * 1100)
    _make_folders(deep)
    (deep / "notes.txt").write_text("deep")
    (root / "config.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "hidden.txt").write_text("skipped")
    found = companion_files(root)
    assert [c.name for c in found] == ["config.json", "/".join(["d"] * 1100) + "/notes.txt"]
    assert found[1].source.read_text() == "deep"


def test_writer_copies_into_and_removes_a_tree_1100_folders_deep(deep: Path) -> None:
    tmp_path = deep
    source = tmp_path / "notes.txt"
    source.write_text("deep")
    relname = "/".join(["d"] * 1100) + "/notes.txt"
    out = tmp_path / "out"
    with CheckpointWriter(out, is_dir=True, inputs=[]) as w:
        w.copy_file(source, relname)
    assert out.joinpath(*relname.split("/")).read_text() == "deep"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(tmp_path / "failed", is_dir=True, inputs=[]) as w:
        w.copy_file(source, relname)
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out"]  # the deep temporary is gone


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda root, outside: (root / "tokenizer.json").symlink_to(outside), "points outside the checkpoint"),
        (lambda root, outside: (root / "tokenizer.json").symlink_to(root / "gone.json"), "dangling symbolic link"),
        (lambda root, outside: (root / "tokenizer.json").symlink_to("tokenizer.json"), "symbolic links"),
        (lambda root, outside: (root / "assets").symlink_to(root / "sub"), "symbolic link to a directory"),
        (lambda root, outside: os.mkfifo(root / "tokenizer.json"), "is a named pipe"),
    ],
    ids=["outside", "dangling", "loop", "to a directory", "pipe"],
)
def test_companion_links_and_special_files_are_refused_by_name(
    tmp_path: Path, make: Callable[[Path, Path], None], words: str, no_hang: None
) -> None:
    root = tmp_path / "base"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    make(root, outside)
    with pytest.raises(InputError, match=re.escape(words)) as error:
        companion_files(root)
    assert str(root) in str(error.value)


def test_companion_links_inside_the_checkpoint_are_copied_as_files(tmp_path: Path) -> None:
    root = tmp_path / "base"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "vocab.txt").write_text("vocab")
    (root / "vocab.txt").symlink_to("sub/vocab.txt")
    found = {c.name: c.source for c in companion_files(root)}
    assert found == {"sub/vocab.txt": root / "sub" / "vocab.txt", "vocab.txt": (root / "sub" / "vocab.txt")}


@pytest.mark.parametrize("case", ["deep", "outside"])
def test_merge_copies_companions_by_the_layout_rule(
    llama_dir: Path, llama_adapter: Path, deep: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = deep
    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    if case == "deep":
        deep = base.joinpath(*["d"] * 1100)
        _make_folders(deep)
        (deep / "notes.txt").write_text("deep")
    else:
        (tmp_path / "secret.txt").write_text("not yours")
        (base / "notes.txt").symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "out"
    code, _, stderr = run_cli(["merge", str(base), str(llama_adapter), "-o", str(out)], capsys)
    if case == "deep":
        assert code == 0, stderr
        assert out.joinpath(*["d"] * 1100, "notes.txt").read_text() == "deep"
    else:
        assert code == 2 and "points outside the checkpoint" in stderr and not out.exists(), stderr


def _make_folders(folder: Path) -> None:
    """mkdir -p without Path.mkdir's recursion (one frame per missing level)."""
    parts = folder.parts
    for i in range(1, len(parts) + 1):
        Path(*parts[:i]).mkdir(exist_ok=True)


# --- OUT: long names, read-only destinations, dangling links ----------------------------------------------------


@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "dir"])
def test_a_250_character_output_name_works(tmp_path: Path, is_dir: bool, llama_dir: Path) -> None:
    """The temporary's name is shortened (kept recognisable and per pid), never the user's."""
    from lorasurgeon.temporaries import TMP_MARK, remove_stale_temporaries, temporary_stem

    name = "m" * 235 + ("" if is_dir else ".safetensors")
    name += "x" * (250 - len(name))
    out = tmp_path / name
    stem = temporary_stem(out)
    assert len(os.fsencode(f"{stem}{TMP_MARK}4194304-old")) <= 255 and stem.startswith(".mmmm")
    assert temporary_stem(tmp_path / ("m" * 250 + "y")) != stem  # a hash of the whole name tells them apart
    with Checkpoint.open(llama_dir) as ckpt, CheckpointWriter(out, is_dir=is_dir, inputs=[]) as w:
        infos = list(ckpt)[:2]
        with w.shard("model.safetensors", [(i.name, i.dtype, i.shape) for i in infos], {}) as stream:
            for info in infos:
                stream.copy_from(ckpt, info)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert set(read_tensors(out)) == {i.name for i in infos}
    stale = tmp_path / f"{stem}{TMP_MARK}999999999"  # a dead run's temporary of this OUT is recognised
    stale.write_text("left by a killed run")
    assert remove_stale_temporaries(out) == [stale] and not stale.exists()


def test_a_read_only_destination_is_reported_as_out_not_the_temporary(
    llama_dir: Path, llama_adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "ro"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        for base, out in ((llama_dir / "model.safetensors", where / "merged.safetensors"), (llama_dir, where / "m")):
            code, _, stderr = run_cli(["merge", str(base), str(llama_adapter), "-o", str(out)], capsys)
            (error,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
            assert code == 2 and error.startswith(f"Error: {out}: ") and "Read-only file system" in error, error
            assert "lorasurgeon-tmp" not in error
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("is_dir", [False, True], ids=["file", "dir"])
def test_a_dangling_symlink_out_is_refused_without_force(tmp_path: Path, is_dir: bool) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match=f"{out}: already exists; pass force=True"):
        CheckpointWriter(out, is_dir=is_dir, inputs=[])
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    with CheckpointWriter(out, is_dir=is_dir, inputs=[], force=True) as w:
        w.write_json("config.json", {}) if is_dir else w.shard("out", [], {}).__enter__().finish()
    assert not out.is_symlink() and not (tmp_path / "nowhere").exists()  # the link replaced, not followed


def test_a_zero_size_tensor_wider_than_torch_is_refused_by_name(tmp_path: Path) -> None:
    """safetensors dimensions are u64: [0, 2**63] is a valid (empty) tensor torch cannot make."""
    from lorasurgeon.errors import UnsupportedError
    from lorasurgeon.header import build_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(build_header([("e", "F32", (0, 2**63))], {}))
    with Checkpoint.open(path) as ckpt:
        assert ckpt.tensors["e"].numel == 0
        with pytest.raises(UnsupportedError, match="tensor 'e' has a dimension torch cannot hold"):
            ckpt.read(ckpt.tensors["e"])
