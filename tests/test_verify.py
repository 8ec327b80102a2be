"""verify (issue 16): MERGED proven to be BASE + ΔW tensor by tensor, through the merge's own plan.

Oracles: PEFT's merge_and_unload + save_pretrained (a merge lorasurgeon did not write, fp32 and bf16, must pass),
and merges made wrong on purpose (scale 0.5, one module skipped, another adapter, a re-saved tied head, edited
tensors), each of which must fail naming the tensor. Every adapter has B ≠ 0.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import model_class, read_tensors, run_cli, save_adapter, save_model
from safetensors.torch import load_file, save_file
from test_formats_kohya import UNET, kohya_name
from test_formats_lycoris import loha, random, save_lycoris, unet

import lorasurgeon
from lorasurgeon.errors import MismatchError

pytestmark = pytest.mark.oracle
SAMPLES = Path(__file__).parent.parent / "samples"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def peft_save(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> Path:
    """PEFT's own merge: the base loaded in `dtype`, merge_and_unload, save_pretrained."""
    from peft import PeftModel

    model = model_class("llama").from_pretrained(base, dtype=dtype)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


def problems(summary: lorasurgeon.VerifySummary) -> dict[str, str]:
    return {p.name: p.kind for p in summary.problems}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = save_model(root / "base", dtype=request.param)
    return base, save_adapter(base, root / "lora", r=4, lora_alpha=8)


def test_passes_on_lorasurgeon_and_peft_merges(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    lorasurgeon.merge(base, [adapter], tmp_path / "ours")
    ours = lorasurgeon.verify(tmp_path / "ours", base, [adapter])
    assert ours.ok and {t.kind for t in ours.tensors} == {"exact"}  # the merge's own arithmetic: bit for bit
    changed = [t for t in ours.tensors if t.adapters]
    assert len(changed) == 14 and len(ours.tensors) == len(read_tensors(base))
    dtype = read_tensors(base)[Q0].dtype
    theirs = lorasurgeon.verify(peft_save(base, adapter, tmp_path / "peft", dtype), base, [adapter])
    assert theirs.ok, [p.message for p in theirs.problems]
    assert {f.name: f.kind for f in theirs.files} == {"config.json": "same", "generation_config.json": "same"}
    worst = max(t.verdict.max_ulps for t in theirs.tensors if t.verdict)
    assert worst <= 1.0  # PEFT's merge is within the default tolerance
    assert not torch.equal(read_tensors(tmp_path / "peft")[Q0], read_tensors(base)[Q0])  # guard: it merged


def test_fails_naming_each_wrong_tensor(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    lorasurgeon.merge(base, [adapter], tmp_path / "half", scale=0.5)
    half = lorasurgeon.verify(tmp_path / "half", base, [adapter])
    assert not half.ok and set(problems(half).values()) == {"wrong scale"} and len(half.problems) == 14
    scales = [t.verdict.scale for t in half.tensors if t.kind == "wrong scale" and t.verdict]
    assert all(s == pytest.approx(0.5, abs=0.01) for s in scales)
    assert any(re.search(rf"{Q0}: wrong scale: MERGED − BASE is 0\.5\d*·ΔW", p.message) for p in half.problems)
    assert lorasurgeon.verify(tmp_path / "half", base, [adapter], weights=[0.5]).ok  # what it is a merge of

    skipped = tmp_path / "skipped"
    shutil.copytree(adapter, skipped)
    tensors = load_file(skipped / "adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj" not in k}
    save_file(kept, skipped / "adapter_model.safetensors")
    lorasurgeon.merge(base, [skipped], tmp_path / "one-skipped")
    assert problems(lorasurgeon.verify(tmp_path / "one-skipped", base, [adapter])) == {Q0: "adapter not applied"}

    other = save_adapter(base, tmp_path / "other", seed=7, r=4, lora_alpha=8)
    lorasurgeon.merge(base, [other], tmp_path / "other-merged")
    wrong = lorasurgeon.verify(tmp_path / "other-merged", base, [adapter])
    assert set(problems(wrong).values()) == {"mismatch"} and len(wrong.problems) == 14


def test_sharded_checkpoints_are_read_by_name(tmp_path: Path) -> None:
    base = save_model(tmp_path / "base", max_shard_size="40KB")
    adapter = save_adapter(base, tmp_path / "lora", r=4, lora_alpha=8)
    assert len(list(base.glob("*.safetensors"))) > 1
    lorasurgeon.merge(base, [adapter], tmp_path / "ours")
    assert lorasurgeon.verify(tmp_path / "ours", base, [adapter]).ok
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_class("llama").from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(tmp_path / "peft", max_shard_size="100KB")  # other shards than the base's
    result = lorasurgeon.verify(tmp_path / "peft", base, [adapter])
    assert result.ok and sum(bool(t.adapters) for t in result.tensors) == 14


def edited(merged: Path, out: Path, change: Any) -> Path:
    shutil.copytree(merged, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_missing_extra_dtype_shape_and_untouched_changes(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "m")
    norm = "model.layers.0.input_layernorm.weight"
    cases = {
        "missing": lambda t: t.pop(Q0),
        "extra": lambda t: t.update(extra=torch.ones(2)),
        "dtype changed": lambda t: t.update({Q0: t[Q0].to(torch.bfloat16)}),
        "shape changed": lambda t: t.update({Q0: t[Q0][:-1].clone()}),
        "changed without an adapter": lambda t: t.update({norm: t[norm] + 1}),
    }
    for kind, change in cases.items():
        result = lorasurgeon.verify(edited(tmp_path / "m", tmp_path / kind, change), llama_dir, [llama_adapter])
        named = {"extra": "extra", "changed without an adapter": norm}.get(kind, Q0)
        assert problems(result) == {named: kind}, kind


def test_a_resaved_model_whose_tied_head_changed(tmp_path: Path) -> None:
    """A tied base with a LoRA on the embedding: the merge unties lm_head (it keeps the base's values while the
    embedding gets ΔW). PEFT's merge_and_unload + save_pretrained of the same adapter merges into the shared tensor
    and saves it tied, with tie_word_embeddings still true: lm_head is gone (the head is now the merged embedding)."""
    base = save_model(tmp_path / "base", tie_word_embeddings=True)
    adapter = save_adapter(base, tmp_path / "lora", r=4, target_modules=["q_proj", "embed_tokens"])
    lorasurgeon.merge(base, [adapter], tmp_path / "m")
    good = lorasurgeon.verify(tmp_path / "m", base, [adapter])
    assert good.ok and "lm_head.weight" in {t.name for t in good.tensors}
    with warnings.catch_warnings():  # PEFT warns that the tied layer is in the adapter (peft#2777): the point here
        warnings.simplefilter("ignore")
        peft_save(base, adapter, tmp_path / "peft", torch.float32)
    bad = lorasurgeon.verify(tmp_path / "peft", base, [adapter])
    assert problems(bad) == {"lm_head.weight": "missing", "config.json": "changed"}
    (config_problem,) = [p for p in bad.problems if p.name == "config.json"]
    assert "tie_word_embeddings is true" in config_problem.message and "lm_head" in config_problem.message
    retied = edited(
        tmp_path / "m",
        tmp_path / "retied",
        lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}),
    )
    assert problems(lorasurgeon.verify(retied, base, [adapter])) == {"lm_head.weight": "changed without an adapter"}


def test_kohya_and_lycoris_adapters_through_the_same_plan(tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    lorasurgeon.convert(SAMPLES / "adapter-lora", kohya, to="kohya", component="lora_unet")
    lorasurgeon.merge(SAMPLES / "base", [kohya], tmp_path / "m")
    assert lorasurgeon.verify(tmp_path / "m", SAMPLES / "base", [kohya]).ok
    assert lorasurgeon.verify(tmp_path / "m", SAMPLES / "base", [SAMPLES / "adapter-lora"]).ok  # the same ΔW
    root, _ = unet(tmp_path)
    name = next(n for n in UNET if n.endswith("to_q.weight"))
    torch.manual_seed(3)
    factors = random(loha(UNET[name][0], 2, UNET[name][1]))
    save_lycoris(tmp_path / "loha.safetensors", {kohya_name("lora_unet", name): (factors, 2.0)})
    lorasurgeon.merge(root, [tmp_path / "loha.safetensors"], tmp_path / "u")
    result = lorasurgeon.verify(tmp_path / "u", root, [tmp_path / "loha.safetensors"])
    assert result.ok and [t.name for t in result.tensors if t.adapters] == [name]
    lorasurgeon.merge(root, [tmp_path / "loha.safetensors"], tmp_path / "u2", scale=2.0)
    assert problems(lorasurgeon.verify(tmp_path / "u2", root, [tmp_path / "loha.safetensors"])) == {name: "wrong scale"}


def test_refuses_adapters_that_do_not_fit(tmp_path: Path, llama_dir: Path) -> None:
    with pytest.raises(MismatchError, match="does not fit the base shape"):
        lorasurgeon.verify(SAMPLES / "base", llama_dir, [SAMPLES / "adapter-lora"])


def test_cli_exit_codes_json_and_markdown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, llama_dir: Path, llama_adapter: Path
) -> None:
    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "m")
    lorasurgeon.merge(llama_dir, [llama_adapter], tmp_path / "half", weights=[0.5])
    args = ["--base", str(llama_dir), str(llama_adapter)]
    code, out, err = run_cli(["verify", str(tmp_path / "m"), *args], capsys)
    assert code == 0 and out == "" and "verified: " in err
    code, out, _ = run_cli(["verify", str(tmp_path / "half"), *args, "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and doc["counts"]["wrong scale"] == 14 and len(doc["problems"]) == 14
    assert any(Q0 in p for p in doc["problems"])
    assert next(t for t in doc["tensors"] if t["name"] == Q0)["scale"] == pytest.approx(0.5, abs=0.01)
    code, out, _ = run_cli(["verify", str(tmp_path / "half"), *args, "--weight", "0.5", "--markdown"], capsys)
    assert code == 0 and out.startswith("**verify: ") and "| tensor | verdict |" in out and "**verified: " in out
    code, _, err = run_cli(["verify", str(tmp_path / "m"), *args, "--tolerance", "-1"], capsys)
    assert code == 2 and "--tolerance -1" in err


@pytest.mark.parametrize("case_id", ["ia3", "vera"])
def test_peft_tuners_through_the_same_plan(tmp_path: Path, case_id: str) -> None:
    """IA3 (a product with W) and VeRA (an additive ΔW) merged by lorasurgeon are proven; VeRA at half weight is
    named a wrong scale (a product takes weight 1 only: the plan refuses it)."""
    from tuner_cases import CASES, build

    built = build(next(c for c in CASES if c.id == case_id), tmp_path)
    lorasurgeon.merge(built.base, [built.adapter], tmp_path / "m")
    result = lorasurgeon.verify(tmp_path / "m", built.base, [built.adapter])
    assert result.ok and sum(bool(t.adapters) for t in result.tensors) >= 4
    if case_id == "vera":
        lorasurgeon.merge(built.base, [built.adapter], tmp_path / "half", weights=[0.5])
        half = lorasurgeon.verify(tmp_path / "half", built.base, [built.adapter])
        assert set(problems(half).values()) == {"wrong scale"}
