"""Tied weights of every architecture users fine-tune with LoRA (lorasurgeon.ties, FORMATS.md §4.1).

The oracle is PEFT's *unmerged* forward on the tied base: the merged directory, loaded by transformers, must load with
no missing or unexpected keys and give the same logits. Each model is tiny (hidden 16, one or two layers) and seeded;
every adapter has B != 0, and the logits are checked to differ from the base's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from tiny_models import ARCHS, Arch, forward, load, save_base

import lorasurgeon

pytestmark = pytest.mark.oracle


def save_lora(arch: Arch, base: Path, path: Path, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():  # PEFT warns that a tied layer is part of the adapter: that is under test
        warnings.simplefilter("ignore")
        model = get_peft_model(load(arch, base), LoraConfig(init_lora_weights=False, r=2, lora_alpha=4, **lora))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.3)
        model.save_pretrained(path)
    return path


def peft_forward(arch: Arch, base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return forward(PeftModel.from_pretrained(load(arch, base), adapter).eval(), arch)


def assert_loads_like_peft(arch: Arch, base: Path, adapter: Path, out: Path) -> None:
    """OUT loads with no missing or unexpected keys and computes PEFT's unmerged forward (which the adapter changes)."""
    merged, info = load(arch, out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    got, expected = forward(merged, arch), peft_forward(arch, base, adapter)
    assert not torch.allclose(expected, forward(load(arch, base), arch), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_id", sorted(ARCHS))
@pytest.mark.parametrize("where", ["embedding", "head", "both"])
def test_tied_lora_gives_peft_forward(tmp_path: Path, arch_id: str, where: str) -> None:
    """A LoRA on the tied embedding, the tied head or both: each keeps its own delta, as in PEFT's forward, so the
    head is written under the architecture's own name and the tie is undone."""
    arch = ARCHS[arch_id]
    base = save_base(arch, tmp_path / "base")
    targets = {"embedding": [arch.embedding], "head": [arch.head], "both": [arch.embedding, arch.head]}[where]
    adapter = save_lora(arch, base, tmp_path / "lora", target_modules=targets)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    out, stored = read_tensors(tmp_path / "out"), read_tensors(base)
    if arch_id == "t5" and where == "embedding":  # T5 ties whatever its config says: only what differs is stored
        written = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    else:
        written = {arch.head_tensor}
    assert written <= out.keys() and not written & stored.keys()
    assert any("as tensors of their own" in w.message for w in summary.plan.warnings)
    assert_loads_like_peft(arch, base, adapter, tmp_path / "out")


def test_untied_names_come_from_transformers(tmp_path: Path) -> None:
    """BERT's head is cls.predictions.decoder, and its bias, tied to cls.predictions.bias, is written too (with
    tie_word_embeddings false nothing ties it any more); no lm_head.weight is invented."""
    arch = ARCHS["bert-mlm"]
    base = save_base(arch, tmp_path / "base")
    adapter = save_lora(arch, base, tmp_path / "lora", target_modules=["word_embeddings"])
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    out = read_tensors(tmp_path / "out")
    assert "lm_head.weight" not in out
    assert torch.equal(out["cls.predictions.decoder.bias"], out["cls.predictions.bias"])
    assert torch.equal(
        out["cls.predictions.decoder.weight"], read_tensors(base)["bert.embeddings.word_embeddings.weight"]
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_t5_shared_gets_the_same_policy(tmp_path: Path) -> None:
    """T5's forward embeds through encoder/decoder.embed_tokens, tied to `shared`: a LoRA on `shared` changes
    nothing PEFT's forward computes. The output keeps that: `shared` gets ΔE, the weights tied to it keep E
    (merge_and_unload would give all of them E + ΔE)."""
    arch = ARCHS["t5"]
    base = save_base(arch, tmp_path / "base")
    adapter = save_lora(arch, base, tmp_path / "lora", target_modules=["shared", "q"])
    lorasurgeon.merge(base, [adapter], tmp_path / "out")
    out, before = read_tensors(tmp_path / "out"), read_tensors(base)["shared.weight"]
    assert not torch.equal(out["shared.weight"], before)
    assert all(torch.equal(out[n], before) for n in ("encoder.embed_tokens.weight", "lm_head.weight"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert_loads_like_peft(arch, base, adapter, tmp_path / "out")


@pytest.mark.parametrize("arch_id", ["gemma", "llama"])
@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head", "q_proj"], ["embed_tokens"]])
def test_ensure_weight_tying_keeps_the_tie(tmp_path: Path, arch_id: str, targets: list[str]) -> None:
    """PEFT >= 0.18 ensure_weight_tying: the head's LoRA is the embedding's (A and B transposed), so PEFT's forward
    uses E + ΔE for both. The output stays tied with E + ΔE once, and the head's saved copy is no ignored module
    (PEFT's own merge_and_unload adds ΔE twice)."""
    from peft import PeftModel

    arch = ARCHS[arch_id]
    base = save_base(arch, tmp_path / "base")
    adapter = save_lora(arch, base, tmp_path / "lora", target_modules=targets, ensure_weight_tying=True)
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert not summary.plan.warnings, [w.message for w in summary.plan.warnings]
    assert "lm_head.weight" not in read_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    assert_loads_like_peft(arch, base, adapter, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = PeftModel.from_pretrained(load(arch, base), adapter).merge_and_unload()
    assert not torch.allclose(forward(peft_merged, arch), forward(load(arch, tmp_path / "out"), arch), atol=1e-3)


def test_ensure_weight_tying_unmerges(tmp_path: Path) -> None:
    """The tied merge taken out again: merged − ΔE, once, is the base's embedding up to rounding; the head's saved
    copy of the base weight is no replacement to refuse."""
    arch = ARCHS["gemma"]
    base = save_base(arch, tmp_path / "base")
    adapter = save_lora(
        arch, base, tmp_path / "lora", target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True
    )
    lorasurgeon.merge(base, [adapter], tmp_path / "merged")
    lorasurgeon.unmerge(tmp_path / "merged", adapter, tmp_path / "unmerged")
    original, merged = (read_tensors(p)["model.embed_tokens.weight"] for p in (base, tmp_path / "merged"))
    restored = read_tensors(tmp_path / "unmerged")["model.embed_tokens.weight"]
    assert not torch.equal(merged, original)
    torch.testing.assert_close(restored, original, rtol=0, atol=1e-6)
    assert "lm_head.weight" not in read_tensors(tmp_path / "unmerged")


def test_a_tie_stored_twice_is_undone_in_config(tmp_path: Path) -> None:
    """A tied base that stores the head too (mergekit writes both): nothing to add, but tie_word_embeddings must go
    false, or a loader that re-ties would throw one of the two values away."""
    from safetensors.torch import save_file

    arch = ARCHS["llama"]
    base = save_base(arch, tmp_path / "base")
    tensors = read_tensors(base)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, base / "model.safetensors")
    adapter = save_lora(arch, base, tmp_path / "lora", target_modules=["embed_tokens"])
    summary = lorasurgeon.merge(base, [adapter], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("sets tie_word_embeddings to false" in w.message for w in summary.plan.warnings)
    assert_loads_like_peft(arch, base, adapter, tmp_path / "out")


def test_unknown_architecture_is_refused_only_when_it_matters(tmp_path: Path) -> None:
    """A tied base of an architecture the table does not know: untying could write the head under a wrong name, so
    a change to the embedding is refused by name; other LoRAs merge, and so does the embedding once config.json
    says nothing is tied."""
    arch = ARCHS["llama"]
    base = save_base(arch, tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MyOwnForCausalLM"]}))
    embedding = save_lora(arch, base, tmp_path / "embed", target_modules=["embed_tokens"])
    plan = lorasurgeon.check(base, [embedding])
    (error,) = plan.errors
    assert error.base_key == "model.embed_tokens.weight" and "MyOwnForCausalLM" in error.message
    assert "tie_word_embeddings" in error.message
    projection = save_lora(arch, base, tmp_path / "q", target_modules=["q_proj"])
    assert not lorasurgeon.check(base, [projection]).findings
    (base / "config.json").write_text(
        json.dumps({**config, "architectures": ["MyOwnForCausalLM"], "tie_word_embeddings": False})
    )
    assert not lorasurgeon.check(base, [embedding]).errors
