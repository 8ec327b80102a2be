"""What merge and unmerge write, and say, about their output and their inputs: config.json states OUT's dtype,
OUT is what its name says, the help names each command's own default, an adapter given twice is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import read_tensors, run_cli

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError, UnsupportedError
from lorasurgeon.formats.peft_config import refusal
from lorasurgeon.model_config import with_dtype


@pytest.mark.oracle
def test_merge_dtype_is_stated_in_config(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """--dtype bf16: config.json says bfloat16 (dtype, and the older torch_dtype where it is), so transformers' default
    from_pretrained loads the bf16 weights as bf16, not as float32 at twice the memory."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    base.mkdir()
    for f in llama_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    assert config["dtype"] == "float32"
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    lorasurgeon.merge(base, [llama_adapter], tmp_path / "out", dtype="bf16")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["dtype"], written["torch_dtype"]) == ("bfloat16", "bfloat16")
    assert {k: v for k, v in written.items() if "dtype" not in k} == {k: v for k, v in config.items() if k != "dtype"}
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(tmp_path / "out").values())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    lorasurgeon.merge(base, [llama_adapter], tmp_path / "kept")
    assert (tmp_path / "kept" / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_dtype_fields_of_sub_configs_are_stated_too() -> None:
    """Composite models (a VLM's text_config, ...) name a dtype per sub-config; a config naming none stays so."""
    config = {"dtype": "float32", "text_config": {"torch_dtype": "float32", "vocab_size": 8}, "vision_config": None}
    assert with_dtype(config, "F16") == {
        "dtype": "float16",
        "text_config": {"torch_dtype": "float16", "vocab_size": 8},
        "vision_config": None,
    }
    assert with_dtype({"model_type": "llama"}, "BF16") == {"model_type": "llama"}


def test_directory_base_refuses_a_file_name(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """OUT mirrors the base: a directory base with `-o merged.safetensors` would quietly make a directory of that
    name; it is refused instead, and a file base writes the one file its name says."""
    with pytest.raises(LorasurgeonError, match=r"merged.safetensors: names one .safetensors file.*directory"):
        lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "merged.safetensors")
    assert not (tmp_path / "merged.safetensors").exists()
    lorasurgeon.merge(llama_dir / "model.safetensors", [llama_adapter], tmp_path / "merged.safetensors")
    assert (tmp_path / "merged.safetensors").is_file()


def test_help_gives_each_default_output(capsys: pytest.CaptureFixture[str]) -> None:
    merge_help = run_cli(["merge", "--help"], capsys)[1]
    unmerge_help = run_cli(["unmerge", "--help"], capsys)[1]
    assert "<base>-merged" in merge_help and "<merged>-unmerged" in " ".join(unmerge_help.split())
    assert "-merged)" not in unmerge_help.replace("-unmerged", "")


def test_unmerge_writes_the_default_its_help_names(work: Path, llama_dir: Path, llama_adapter: Path) -> None:
    lorasurgeon.merge(llama_dir, [llama_adapter], work / "merged")
    summary = lorasurgeon.unmerge(work / "merged", llama_adapter)
    assert Path(summary.output) == Path("merged-unmerged") and (work / "merged-unmerged").is_dir()


def test_an_adapter_given_twice_is_named(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """Twice the same adapter adds its ΔW twice: allowed (weights 0.5 + 0.5 is a whole), but said, by name."""
    plan = lorasurgeon.check(llama_dir, [llama_adapter, llama_adapter])
    (warning,) = plan.warnings
    assert str(llama_adapter) in warning.message and "given 2 times" in warning.message
    assert not lorasurgeon.check(llama_dir, [llama_adapter]).warnings


@pytest.mark.parametrize(
    ("fields", "expected", "reasons"),
    [
        (
            {"layer_replication": [[0, 1]]},
            "uses layer replication (layer_replication), which PEFT cannot merge either",
            1,
        ),
        ({"velora_config": {"x": 1}}, "uses VeLoRA (velora_config), which lorasurgeon cannot merge yet", 1),
        (
            {"layer_replication": [[0, 1]], "use_qalora": True, "kasa_config": {"x": 1}},
            "layer replication (layer_replication), which PEFT cannot merge either; and KaSA (kasa_config) and "
            "QA-LoRA (use_qalora), which lorasurgeon cannot merge yet",
            2,
        ),
    ],
)
def test_refusals_say_each_reason_once(fields: dict[str, object], expected: str, reasons: int) -> None:
    error = refusal(Path("adapter_config.json"), {"peft_type": "LORA", **fields})
    assert isinstance(error, UnsupportedError) and expected in str(error)
    assert str(error).count("cannot merge") == reasons
