"""Exact lowerings, end to end (`convert --for`, lowering.py, runtime_lowering.py): for each runtime the lowered
adapter passes that runtime's rules where the source fails them, and gives the source's ΔW.

Oracles: PEFT (PeftModel.from_pretrained of the lowered adapter gives the source adapter's logits), and verify
(merging the lowered adapter gives, within one ulp, the merge of the source). Every adapter has B ≠ 0.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import model_class, read_tensors, run_cli, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_formats_peft import hf_adapter

import lorasurgeon
from lorasurgeon import lowering
from lorasurgeon.errors import LorasurgeonError, UnsupportedError

pytestmark = pytest.mark.oracle
SAMPLES = Path(__file__).parent.parent / "samples"
TOKENS = torch.arange(32).reshape(4, 8)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT warns about LoRA on a tied lm_head; the logits are what is tested
        warnings.simplefilter("ignore")
        model = model_class("llama").from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            return model(input_ids=TOKENS).logits


def errors(base: Path, adapter: Path, runtime: str, **server: Any) -> list[str]:
    return [f.message for f in lorasurgeon.check(base, [adapter], target=runtime, server=server).errors]


@pytest.mark.parametrize("runtime", ["vllm", "sglang", "llamacpp", "tgi", "lorax", "peft"])
def test_each_runtime_gets_the_same_delta_in_a_form_it_reads(tmp_path: Path, runtime: str) -> None:
    """samples/adapter-rslora (rsLoRA, rank_pattern, alpha_pattern) fails every runtime but PEFT; lowered, it
    passes, PEFT gives it the source's logits, and its merge is the source's within one ulp."""
    base, source = SAMPLES / "base", SAMPLES / "adapter-rslora"
    assert bool(errors(base, source, runtime)) == (runtime != "peft")
    summary = lorasurgeon.convert(source, tmp_path / "out", runtime=runtime)
    assert errors(base, tmp_path / "out", runtime) == []
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and not config["use_rslora"] and summary.folded
    assert (summary.rank is not None) == (runtime in ("vllm", "sglang", "tgi", "lorax"))  # global-r readers
    if summary.rank is not None:
        assert config["rank_pattern"] == {} and config["r"] == summary.rank
        assert {t.shape[0] for k, t in read_tensors(tmp_path / "out").items() if "lora_A" in k} == {summary.rank}
    torch.testing.assert_close(peft_logits(base, tmp_path / "out"), peft_logits(base, source), rtol=1e-5, atol=1e-5)
    lorasurgeon.merge(base, [tmp_path / "out"], tmp_path / "merged")
    verified = lorasurgeon.verify(tmp_path / "merged", base, [source])
    assert verified.ok and sum(bool(t.adapters) for t in verified.tensors) == 14


def test_sgmv_runtimes_pad_to_their_kernel_ranks(tmp_path: Path, llama_dir: Path, llama_adapter: Path) -> None:
    """r=4 is padded to 8·world_size by LoRAX and TGI at load, which then scale later layer types by the padded r:
    the lowering pads the factors itself, with the alpha for the new rank."""
    (problem,) = {m.split(" — ")[0].split(": ", 2)[2] for m in errors(llama_dir, llama_adapter, "lorax")}
    assert "padded to 8 at load" in problem
    assert any("padded to 16" in m for m in errors(llama_dir, llama_adapter, "tgi", world_size=2))
    summary = lorasurgeon.convert(llama_adapter, tmp_path / "out", runtime="tgi", server={"world_size": 2})
    assert summary.rank == 16 and errors(llama_dir, tmp_path / "out", "tgi", world_size=2) == []
    tensors, before = read_tensors(tmp_path / "out"), read_tensors(llama_adapter)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape[0] == 16 and torch.equal(tensors[key][:4], before[key]) and not tensors[key][4:].any()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 32  # 8·16/4
    torch.testing.assert_close(peft_logits(llama_dir, tmp_path / "out"), peft_logits(llama_dir, llama_adapter))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_become_embedding_lora_rows(tmp_path: Path, tied: bool) -> None:
    """PEFT's trainable tokens (new rows, not deltas) as an embedding LoRA from BASE's rows; on a tied base also
    as an lm_head LoRA, since PEFT's trainable tokens change the tied head too."""
    base = save_model(tmp_path / "base", tie_word_embeddings=tied)
    source = hf_adapter(base, tmp_path / "tokens", r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 17])
    assert any("vllm.trainable-tokens" in m for m in errors(base, source, "vllm"))
    with pytest.raises(LorasurgeonError, match="from the base's tensors; pass base=…"):
        lorasurgeon.convert(source, tmp_path / "no-base", runtime="vllm")
    summary = lorasurgeon.convert(source, tmp_path / "out", runtime="vllm", base=base)
    assert summary.added == (("model.embed_tokens", "lm_head") if tied else ("model.embed_tokens",))
    assert errors(base, tmp_path / "out", "vllm") == [] and summary.carried == ()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] is None and "model.embed_tokens" in config["target_modules"]
    without = peft_logits(base, hf_adapter(base, tmp_path / "q-only", r=2, target_modules=["q_proj"]))
    expected = peft_logits(base, source)
    assert not torch.allclose(without, expected, atol=1e-3)  # guard: the rows matter
    torch.testing.assert_close(peft_logits(base, tmp_path / "out"), expected, rtol=1e-5, atol=1e-5)
    if tied:  # llama.cpp refuses an lm_head LoRA on a tied base: no exact lowering
        with pytest.raises(UnsupportedError, match=r"lm_head .*\(llamacpp\.tied-lm-head\)"):
            lorasurgeon.convert(source, tmp_path / "llama", runtime="llamacpp", base=base)


def test_missing_layers_are_filled_with_zero_modules(tmp_path: Path, llama_dir: Path) -> None:
    source = hf_adapter(llama_dir, tmp_path / "half", r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
    assert any("lorax.every-layer" in m for m in errors(llama_dir, source, "lorax"))
    summary = lorasurgeon.convert(source, tmp_path / "out", runtime="lorax", base=llama_dir)
    assert set(summary.added) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert errors(llama_dir, tmp_path / "out", "lorax") == []
    zero = read_tensors(tmp_path / "out")["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert zero.shape == (16, 8) and not zero.any()
    torch.testing.assert_close(peft_logits(llama_dir, tmp_path / "out"), peft_logits(llama_dir, source))


def test_what_cannot_be_lowered_is_refused_by_name(tmp_path: Path, llama_dir: Path) -> None:
    dora = hf_adapter(llama_dir, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedError, match=r"DoRA magnitude vector .*\(vllm\.dora\)"):
        lorasurgeon.convert(dora, tmp_path / "x", runtime="vllm")
    big = hf_adapter(llama_dir, tmp_path / "big", r=8, target_modules=["q_proj"])
    with pytest.raises(UnsupportedError, match=r"has rank 8, above max_lora_rank 4 .*\(sglang\.max-lora-rank\)"):
        lorasurgeon.convert(big, tmp_path / "x", runtime="sglang", server={"max_lora_rank": 4})
    with pytest.raises(LorasurgeonError, match="patterns=True and runtime='vllm' are exclusive"):
        lorasurgeon.convert(big, tmp_path / "x", runtime="vllm", patterns=True)
    with pytest.raises(LorasurgeonError, match="to='kohya' is not what vllm reads"):
        lorasurgeon.convert(big, tmp_path / "x.safetensors", runtime="vllm", to="kohya")
    assert not (tmp_path / "x").exists()


def test_diffusers_gets_its_scales_in_the_file(tmp_path: Path) -> None:
    base, source = SAMPLES / "base", SAMPLES / "adapter-lora"
    assert any("diffusers.scale-metadata" in m for m in errors(base, source, "diffusers"))
    out = tmp_path / "lora.safetensors"
    summary = lorasurgeon.convert(source, out, runtime="diffusers", component="unet")
    assert summary.target_format == "diffusers" and errors(base, out, "diffusers") == []


def test_cli_convert_for(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "lowered"
    code, _, err = run_cli(["convert", str(SAMPLES / "adapter-rslora"), "--for", "lorax", "-o", str(out)], capsys)
    assert code == 0 and "lowered for lorax" in err and "padded with zeros to rank 8" in err
    code, _, err = run_cli(["convert", str(SAMPLES / "adapter-rslora"), "-o", str(tmp_path / "x")], capsys)
    assert code == 2 and "--to FORMAT or --for RUNTIME" in err
    args = ["convert", str(SAMPLES / "adapter-lora"), "--for", "llamacpp", "--max-lora-rank", "8", "-o", "y"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--max-lora-rank is no server option of llamacpp" in err


# --- the pure lowerings -------------------------------------------------------------------------------------


def test_fold_rounds_b_once() -> None:
    torch.manual_seed(0)
    b = torch.randn(64, 8).to(torch.bfloat16)
    assert lowering.fold(b, 1.0) is b  # factor 1: B bit for bit
    folded = lowering.fold(b, 0.3)
    exact = b.double() * 0.3
    assert folded.dtype == torch.bfloat16 and not torch.equal(folded, b)
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 8)  # bf16 ulp at c·B
    assert bool(((folded.double() - exact).abs() <= spacing / 2).all())
    with pytest.raises(UnsupportedError):
        lowering.fold(b, float("inf"))
    with pytest.raises(UnsupportedError, match="cannot pad a rank-8"):
        lowering.pad_rank(torch.ones(8, 4), 4, 0)


def test_token_rows_refuse_what_fp32_cannot_hold() -> None:
    new, old = torch.tensor([[1e-30, 2.0]]), torch.tensor([[1.0, 1.0]])  # fp32(1 + (1e-30 − 1)) = 0
    with pytest.raises(UnsupportedError, match="more than fp32 holds exactly"):
        lowering.token_rows_to_lora(new, old, [0], 4)
    with pytest.raises(UnsupportedError, match="distinct rows"):
        lowering.token_rows_to_lora(torch.ones(2, 2), torch.zeros(2, 2), [1, 1], 4)
    a, b, alpha = lowering.token_rows_to_lora(torch.ones(1, 2), torch.zeros(1, 2), [2], 4, layout="linear")
    assert torch.equal(b @ a, torch.tensor([[0.0, 0], [0, 0], [1, 1], [0, 0]])) and alpha == 1.0


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_padding_leaves_the_product_bit_for_bit(rank: int, extra: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-8, 9, (rank, 5), generator=generator).float()  # small integers: every sum is exact
    b = torch.randint(-8, 9, (7, rank, 1, 1), generator=generator).float()  # a 1×1 conv's B
    a2, b2 = lowering.lowered(a, "a", rank + extra, 1.0), lowering.lowered(b, "b", rank + extra, 1.0)
    assert a2.shape == (rank + extra, 5) and b2.shape == (7, rank + extra, 1, 1)
    assert torch.equal(b2.flatten(1) @ a2, b.flatten(1) @ a)
