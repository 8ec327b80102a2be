"""The single-alpha form (issue 16, formats.scale_form): every adapter lorasurgeon writes gives PEFT's ΔW under
llama.cpp's reading too, one lora_alpha and each module's rank from its B, and `patterns` keeps PEFT's own form.

Oracles: llama.cpp's rule, written from its source (below; bench/llamacpp_lora.py runs the real converter), and
PEFT's own reading of the config (rank_pattern, alpha_pattern, use_rslora) and merge.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from builders import read_tensors
from test_extract import low_rank_deltas, save_variant

import lorasurgeon

pytestmark = pytest.mark.oracle
SAMPLES = Path(__file__).parent.parent / "samples"


def llamacpp_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as llama.cpp computes it, written from its source, not from lorasurgeon:

    convert_lora_to_gguf.py stores one `adapter.lora.alpha = lparams["lora_alpha"]` and the factors as they are
    (`self._rank = B.shape[-1]`); src/llama-adapter.h:
        const float rank  = (float) b->ne[0];
        const float scale = alpha ? adapter_scale * alpha / rank : adapter_scale;
    (b->ne[0] is B's column count), applied as scale·B@(A@x) with adapter_scale 1.0, the default. rank_pattern,
    alpha_pattern and use_rslora are never read.
    """
    alpha = float(json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"])
    return {
        module: (alpha / b.shape[1] if alpha else 1.0) * (b.double() @ a.double())
        for module, (a, b) in factors(adapter).items()
    }


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as PEFT reads the config (its pattern rule: the first key matching a dotted suffix)."""
    config = json.loads((adapter / "adapter_config.json").read_text())

    def pattern(patterns: dict[str, float], module: str, default: float) -> float:
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)

    out = {}
    for module, (a, b) in factors(adapter).items():
        rank = pattern(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        assert rank == a.shape[0], module
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out[module] = scale * (b.double() @ a.double())
    return out


def factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            a,
            tensors[key.replace("lora_A", "lora_B")],
        )
        for key, a in tensors.items()
        if key.endswith(".lora_A.weight")
    }


def relative_errors(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    assert ours.keys() == want.keys()
    return {m: float((ours[m] - want[m]).norm() / want[m].norm()) for m in want}


@pytest.fixture(scope="module")
def energy_extract(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> tuple[Path, Path]:
    """A fine-tune of exact ranks 2 and 4 by module, so `extract --energy 1` writes different ranks."""
    root = tmp_path_factory.mktemp("single-alpha")
    deltas = low_rank_deltas(llama_dir, rank=4)
    two = low_rank_deltas(llama_dir, rank=2, seed=6)
    changed = {n: two[n] if "mlp" in n else t for n, t in deltas.items()}
    return llama_dir, save_variant(llama_dir, root / "tuned", changed)


@pytest.mark.parametrize("patterns", [False, True], ids=["single-alpha", "patterns"])
def test_extract_with_many_ranks_under_llamacpps_rule(
    tmp_path: Path, energy_extract: tuple[Path, Path], patterns: bool
) -> None:
    base, tuned = energy_extract
    summary = lorasurgeon.extract(base, tuned, tmp_path / "lora", energy=0.9999, patterns=patterns)
    assert {m.rank for m in summary.matrices} == {2, 4}
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    peft = peft_deltas(tmp_path / "lora")
    errors = relative_errors(llamacpp_deltas(tmp_path / "lora"), peft)
    if patterns:  # the defect: alpha_pattern = rank, scale 1, read by llama.cpp as lora_alpha / rᵢ
        assert config["alpha_pattern"] and not summary.folded
        assert sorted({round(e, 6) for e in errors.values()}) == [0.0, 1.0]  # rank-2 modules at twice the scale
    else:
        assert config["alpha_pattern"] == {} and config["lora_alpha"] == 4 and len(summary.folded) == 6
        assert max(errors.values()) < 1e-6
    merged = lorasurgeon.merge(base, [tmp_path / "lora"], tmp_path / "merged")
    assert merged.changed == 14
    deltas = {m.tensor: read_tensors(tuned)[m.tensor] - read_tensors(base)[m.tensor] for m in summary.matrices}
    for m in summary.matrices:  # PEFT's reading is the fine-tune's ΔW in both forms
        assert (peft[m.module].float() - deltas[m.tensor]).abs().max() <= 1e-5 * deltas[m.tensor].abs().max()


def test_convert_folds_what_one_alpha_cannot_state(tmp_path: Path) -> None:
    """samples/adapter-rslora: rsLoRA with a rank_pattern and an alpha_pattern. Converted, llama.cpp's rule gives
    PEFT's ΔW up to one rounding of B; the modules whose scale the one alpha gives keep every byte."""
    source = SAMPLES / "adapter-rslora"
    before = relative_errors(llamacpp_deltas(source), peft_deltas(source))
    assert max(before.values()) > 0.5  # guard: read wrong as it is
    summary = lorasurgeon.convert(source, tmp_path / "out", to="peft")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["use_rslora"] is False and config["rank_pattern"]
    assert config["lora_alpha"] == pytest.approx(16 * math.sqrt(8)) and config["r"] == 8
    after = relative_errors(llamacpp_deltas(tmp_path / "out"), peft_deltas(source))
    assert max(after.values()) < 1e-6
    assert relative_errors(peft_deltas(tmp_path / "out"), peft_deltas(source)) == pytest.approx(after, abs=1e-12)
    old, new = factors(source), factors(tmp_path / "out")
    folded = set(summary.folded)
    assert folded == {m for m in old if "down_proj" in m or "o_proj" in m}
    for module in old:
        assert torch.equal(new[module][0], old[module][0])  # A: byte for byte
        assert torch.equal(new[module][1], old[module][1]) == (module not in folded)
    lorasurgeon.merge(SAMPLES / "base", [tmp_path / "out"], tmp_path / "merged")
    assert lorasurgeon.verify(tmp_path / "merged", SAMPLES / "base", [source]).ok


def test_patterns_keep_the_source_config_and_bytes(tmp_path: Path) -> None:
    source = SAMPLES / "adapter-rslora"
    summary = lorasurgeon.convert(source, tmp_path / "out", to="peft", patterns=True)
    assert summary.folded == ()
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written == json.loads((source / "adapter_config.json").read_text())
    old, new = read_tensors(source / "adapter_model.safetensors"), read_tensors(tmp_path / "out")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_an_adapter_already_in_the_form_is_copied_as_it_is(tmp_path: Path) -> None:
    source = SAMPLES / "adapter-lora"
    summary = lorasurgeon.convert(source, tmp_path / "out", to="peft")
    assert summary.folded == () and not any(c.rewritten for c in summary.modules)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written == json.loads((source / "adapter_config.json").read_text())
    old, new = read_tensors(source / "adapter_model.safetensors"), read_tensors(tmp_path / "out")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
