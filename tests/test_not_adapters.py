"""Inputs that are no LoRA adapter, or not one adapter, are refused or described as what they are (issue 11;
fixed with the formats wing, checked here against the inputs people actually pass)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from builders import model_class, run_cli

import lorasurgeon
from lorasurgeon.errors import InputError

SAMPLES = Path(__file__).parent.parent / "samples"


def test_a_checkpoint_given_as_the_adapter_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """merge BASE BASE/model.safetensors --alpha 16 replaced every base tensor; check said "0 modules checked: the
    adapter fits". Both refuse, saying what the file looks like and pointing to extract."""
    weights = SAMPLES / "base" / "model.safetensors"
    with pytest.raises(InputError, match=r"not an adapter; it looks like a model checkpoint .*extract"):
        lorasurgeon.merge(SAMPLES / "base", [weights], tmp_path / "out", alpha=16)
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["check", str(SAMPLES / "base"), str(weights), "--alpha", "16"], capsys)
    assert code == 2 and "not an adapter" in err and "fits" not in err


@pytest.mark.parametrize("what", ["checkpoint", "empty"])
def test_a_directory_without_adapter_weights_names_what_it_holds(tmp_path: Path, what: str) -> None:
    """It used to say "adapter_model.bin: is a PyTorch pickle file", naming a file that does not exist."""
    folder = tmp_path / what
    if what == "checkpoint":
        shutil.copytree(SAMPLES / "base", folder)
    else:
        folder.mkdir()
    with pytest.raises(InputError) as error:
        lorasurgeon.merge(SAMPLES / "base", [folder], tmp_path / "out")
    assert ".bin" not in str(error.value)
    assert ("model checkpoint directory" if what == "checkpoint" else "holds no adapter_model.safetensors") in str(
        error.value
    )


def test_several_named_adapters_and_no_default_are_listed(tmp_path: Path) -> None:
    """PEFT refuses such a directory; lorasurgeon merged the first silently. Now it lists them, and DIR/b works."""
    for name in ("a", "b"):
        shutil.copytree(SAMPLES / "adapter-lora", tmp_path / "saved" / name)
    with pytest.raises(InputError, match=r"holds 2 named adapters \(a, b\) and no default one"):
        lorasurgeon.check(SAMPLES / "base", [tmp_path / "saved"])
    assert not lorasurgeon.check(SAMPLES / "base", [tmp_path / "saved" / "b"]).errors


@pytest.mark.oracle
@pytest.mark.parametrize("tuner", ["IA3", "OFT", "LOHA"])
def test_report_says_what_another_peft_tuner_is(tmp_path: Path, llama_dir: Path, tuner: str) -> None:
    """report without --base listed IA3/OFT/LoHa tensors as `replacement` modules with ok: true (a valid OFT config
    even exited 2 on r = 0): they are described by their peft_type and what the tuner is; lorasurgeon merges these
    three, so nothing is refused and --fail-on mismatch stays quiet (a refused tuner fires it: test_tuners.py)."""
    import peft

    configs = {
        "IA3": peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "OFT": peft.OFTConfig(target_modules=["q_proj"], r=0, oft_block_size=8),
        "LOHA": peft.LoHaConfig(target_modules=["q_proj"], r=2, init_weights=False),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model_class("llama").from_pretrained(llama_dir), configs[tuner])
        model.save_pretrained(tmp_path / "tuner")
    report = lorasurgeon.report(tmp_path / "tuner", fail_on=["mismatch"])
    assert report.modules and {m.kind for m in report.modules} == {tuner.lower()}
    assert report.tuner is not None and report.tuner.peft_type == tuner and report.tuner.merge.startswith("exact")
    assert not report.findings and not report.fired
