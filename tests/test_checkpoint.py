"""Reading every checkpoint layout, writing safetensors ourselves, and publishing atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import metadata_of, read_tensors, save_model
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import OutputError
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
