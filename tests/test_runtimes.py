"""Runtime rules (runtimes.py): every rule both ways, the server options, and the lowering plan; llama.cpp's
scale rule (quoted from its source) against the fold."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import run_cli

import lorasurgeon
from lorasurgeon import lowering, runtimes
from lorasurgeon.adapter_facts import AdapterFacts, ModuleFacts, facts_of
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import UnsupportedError
from lorasurgeon.formats import load_adapter
from lorasurgeon.formats.scale_form import ScaleForm, scale_form
from lorasurgeon.runtime_rules import RULES

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")


def module(path: str, rank: int = 16, alpha: float = 32.0) -> ModuleFacts:
    return ModuleFacts(path, "linear", rank, alpha, alpha / rank)


# A plain adapter every runtime serves as PEFT does: r=16 (a vLLM default, an SGMV rank), one alpha, two layers.
PLAIN = AdapterFacts(
    tuple(module(f"model.layers.{i}.{p}") for i in range(2) for p in PROJECTIONS),
    r=16,
    lora_alpha=32.0,
    base_vocab=128,
    num_layers=2,
)
Q0 = "model.layers.0.self_attn.q_proj"


def modules(facts: AdapterFacts, change: Callable[[ModuleFacts], ModuleFacts]) -> AdapterFacts:
    """`facts` with layer 0's q_proj changed."""
    return dataclasses.replace(facts, modules=tuple(change(m) if m.path == Q0 else m for m in facts.modules))


RANKS = [16, 8, 16, 32, 16, 8, 16, 32]


def extract_like(facts: AdapterFacts) -> AdapterFacts:
    """What `extract --energy` writes: ranks per module (rank_pattern) with alpha = rank (alpha_pattern), so
    scale 1 everywhere, and r = lora_alpha = 16."""
    changed = tuple(
        ModuleFacts(m.path, m.kind, rank, float(rank), 1.0) for m, rank in zip(facts.modules, RANKS, strict=True)
    )
    return dataclasses.replace(facts, modules=changed, r=16, lora_alpha=16.0, rank_pattern=True, alpha_pattern=True)


def rank_patterned(facts: AdapterFacts) -> AdapterFacts:
    """Ranks per module with one alpha (rank_pattern only): PEFT's scale is lora_alpha / rᵢ."""
    changed = tuple(module(m.path, rank, facts.lora_alpha) for m, rank in zip(facts.modules, RANKS, strict=True))
    return dataclasses.replace(facts, modules=changed, rank_pattern=True)


def rslora(facts: AdapterFacts) -> AdapterFacts:
    changed = tuple(dataclasses.replace(m, scale=m.alpha / math.sqrt(m.rank)) for m in facts.modules)
    return dataclasses.replace(facts, modules=changed, use_rslora=True)


EMBED = ModuleFacts("model.embed_tokens", "embedding", 16, 32.0, 2.0, vocab=128)
HEAD = module("lm_head")
FAILING: dict[str, Callable[[AdapterFacts], AdapterFacts]] = {
    "format": lambda f: dataclasses.replace(f, format="kohya"),
    "scale": lambda f: dataclasses.replace(
        modules(f, lambda m: dataclasses.replace(m, alpha=64.0, scale=4.0)), alpha_pattern=True
    ),
    "dora": lambda f: modules(f, lambda m: dataclasses.replace(m, dora=True)),
    "lora-bias": lambda f: modules(f, lambda m: dataclasses.replace(m, bias=True)),
    "full-tensors": lambda f: dataclasses.replace(f, full_tensors=("model.embed_tokens.weight",)),
    "trainable-tokens": lambda f: dataclasses.replace(f, trainable_tokens=("model.embed_tokens",)),
    "vllm.max-lora-rank": lambda f: modules(f, lambda m: dataclasses.replace(m, rank=24, scale=32 / 24)),
    "vllm.modules-to-save": lambda f: dataclasses.replace(f, modules_to_save=("lm_head",)),
    "vllm.init": lambda f: dataclasses.replace(f, init_lora_weights="pissa"),
    "vllm.alora": lambda f: dataclasses.replace(f, variants=("alora_invocation_tokens",)),
    "vllm.layer-replication": lambda f: dataclasses.replace(f, variants=("layer_replication",)),
    "vllm.bdlora": lambda f: dataclasses.replace(f, variants=("use_bdlora",)),
    "vllm.qalora": lambda f: dataclasses.replace(f, variants=("use_qalora",)),
    "vllm.bias": lambda f: dataclasses.replace(f, bias="all"),
    "vllm.extra-vocab": lambda f: dataclasses.replace(f, modules=(*f.modules, dataclasses.replace(EMBED, vocab=130))),
    "sglang.peft-type": lambda f: dataclasses.replace(f, peft_type="LOHA"),
    "sglang.scale": rslora,
    "sglang.max-lora-rank": lambda f: modules(f, lambda m: dataclasses.replace(m, rank=32, scale=1.0)),
    "sglang.added-tokens": lambda f: dataclasses.replace(f, added_tokens=2),
    "sglang.embedding-lora": lambda f: dataclasses.replace(f, modules=(*f.modules, EMBED)),
    "llamacpp.tied-lm-head": lambda f: dataclasses.replace(f, modules=(*f.modules, HEAD), tied_embeddings=True),
    "rank-padding": lambda f: dataclasses.replace(
        f, modules=tuple(dataclasses.replace(m, rank=4, scale=8.0) for m in f.modules), r=4
    ),
    "uniform-rank": lambda f: dataclasses.replace(
        modules(f, lambda m: dataclasses.replace(m, rank=32, scale=1.0)), rank_pattern=True
    ),
    "every-layer": lambda f: dataclasses.replace(f, modules=tuple(m for m in f.modules if m.path != Q0)),
    "linear-only": lambda f: dataclasses.replace(f, modules=(*f.modules, EMBED)),
    "diffusers.scale-metadata": lambda f: dataclasses.replace(f, format="diffusers", scale_metadata=False),
    "peft.fields": lambda f: dataclasses.replace(f, config_fields=frozenset({"trainable_token_indices"})),
}
# Server options under which a rule can be seen to fail (the defaults serve some of these adapters).
OPTIONS = {
    "sglang.embedding-lora": {"embedding_lora": False},
    "sglang.max-lora-rank": {"max_lora_rank": 16},
    "peft.fields": {"peft_version": (0, 14)},
}
CASES = [(runtime, rule.id) for runtime, rules in RULES.items() for rule in rules]


def failing(rule_id: str) -> Callable[[AdapterFacts], AdapterFacts]:
    return FAILING.get(rule_id) or FAILING[rule_id.split(".", 1)[1]]


@pytest.mark.parametrize("runtime", sorted(RULES))
def test_a_plain_adapter_passes_every_runtime(runtime: str) -> None:
    assert runtimes.judge(runtime, PLAIN) == []


@pytest.mark.parametrize(("runtime", "rule_id"), CASES)
def test_every_rule_fails_an_adapter_that_breaks_it(runtime: str, rule_id: str) -> None:
    options = OPTIONS.get(rule_id, {})
    assert runtimes.judge(runtime, PLAIN, **options) == []
    findings = runtimes.judge(runtime, failing(rule_id)(PLAIN), **options)
    mine = [f for f in findings if f"rule {rule_id}:" in f.message]
    assert mine, [f.message for f in findings]
    rule = next(r for r in RULES[runtime] if r.id == rule_id)
    assert all(f.severity == "error" and rule.source in f.message for f in mine)
    assert all(f.message.startswith(f"{f.adapter_key or 'adapter'}: ") for f in mine)


def test_vllm_max_lora_rank_names_the_smallest_rank_that_serves() -> None:
    over = failing("vllm.max-lora-rank")(PLAIN)
    (finding,) = runtimes.judge("vllm", over, reads_patterns=True)
    assert finding.adapter_key == Q0 and "--max-lora-rank 32" in finding.message
    assert runtimes.judge("vllm", over, max_lora_rank=32, reads_patterns=True) == []
    huge = modules(PLAIN, lambda m: dataclasses.replace(m, rank=600, scale=32 / 600))
    assert "resize" in runtimes.judge("vllm", huge, max_lora_rank=512)[0].message
    config_r = dataclasses.replace(PLAIN, r=64)  # vLLM checks max(r, rank_pattern values) too
    assert runtimes.judge("vllm", config_r)[0].adapter_key is None
    with pytest.raises(UnsupportedError, match="one of 1, 8, 16, 32, 64, 128, 256, 320, 512"):
        runtimes.judge("vllm", PLAIN, max_lora_rank=24)


def test_global_and_tensor_rank_readers_fail_different_adapters() -> None:
    patterned, extracted = rank_patterned(PLAIN), extract_like(PLAIN)
    wrong = {m.path for m in patterned.modules if m.rank != 16}
    assert {f.adapter_key for f in runtimes.judge("vllm", patterned, max_lora_rank=32)} == wrong
    assert runtimes.judge("vllm", patterned, max_lora_rank=32, reads_patterns=True) == []
    assert {f.adapter_key for f in runtimes.judge("sglang", patterned)} == wrong | {
        m.path
        for m in patterned.modules
        if m.rank > 16  # and above the config's r, SGLang's max_lora_rank
    }
    assert runtimes.judge("llamacpp", patterned) == []  # α / rank-of-the-tensor is PEFT's α / rᵢ here
    assert {f.adapter_key for f in runtimes.judge("llamacpp", extracted)} == wrong  # but not with alpha_pattern
    assert runtimes.judge("vllm", rslora(PLAIN)) == []  # vLLM reads use_rslora (global r)
    assert runtimes.judge("llamacpp", rslora(PLAIN))


def test_unknown_runtimes_and_options_are_named() -> None:
    with pytest.raises(UnsupportedError, match="unknown runtime 'ollama'"):
        runtimes.judge("ollama", PLAIN)
    with pytest.raises(UnsupportedError, match="max_lora_rank=… is no server option of llamacpp"):
        runtimes.judge("llamacpp", PLAIN, max_lora_rank=16)


def single_alpha(facts: AdapterFacts, rank: int | None = None) -> ScaleForm:
    """The single-alpha form every adapter lorasurgeon writes is in (convert --for pads it to `rank`)."""
    return scale_form([m.path for m in facts.modules], [(m.rank, m.alpha, m.scale) for m in facts.modules], rank=rank)


def test_the_lowering_plan_for_llamacpp_folds_into_one_alpha() -> None:
    facts = extract_like(PLAIN)
    plan = runtimes.plan_lowering("llamacpp", facts)
    assert plan.steps == ("fold",) and not plan.uniform
    form = single_alpha(facts)
    assert {m.alpha for m in form.modules} == {16.0} and not form.use_rslora  # the most frequent s·r
    for m, written, factor in zip(facts.modules, form.modules, form.factors, strict=True):
        assert written.rank == m.rank
        assert math.isclose(written.alpha / m.rank * factor, m.scale)  # the runtime's scale × c = PEFT's
    assert set(form.factors) == {1.0, 0.5, 2.0}


def test_the_lowering_plan_for_lorax_pads_every_module_to_one_rank() -> None:
    facts = rslora(extract_like(PLAIN))
    plan = runtimes.plan_lowering("lorax", facts)
    assert plan.uniform and "uniform" in plan.steps
    rank = runtimes.uniform_rank("lorax", [m.rank for m in facts.modules])
    assert rank == 32 and runtimes.uniform_rank("lorax", [4, 8]) == 8 and runtimes.uniform_rank("tgi", [17]) == 32
    form = single_alpha(facts, rank)
    for m, written, factor in zip(facts.modules, form.modules, form.factors, strict=True):
        assert written.rank == 32 and math.isclose(written.alpha / 32 * factor, m.scale)
    missing = failing("every-layer")(PLAIN)
    assert runtimes.plan_lowering("tgi", missing).fill == ("q_proj",)


def test_the_lowering_plan_refuses_what_has_no_exact_lowering() -> None:
    facts = dataclasses.replace(failing("dora")(PLAIN), variants=("layer_replication",))
    with pytest.raises(UnsupportedError, match=r"DoRA .*\(vllm\.dora\).*layer_replication"):
        runtimes.plan_lowering("vllm", facts)
    assert runtimes.plan_lowering("vllm", PLAIN).steps == ()


def llamacpp_delta(a: torch.Tensor, b: torch.Tensor, lora_alpha: float) -> torch.Tensor:
    """llama.cpp's ΔW, written from its source, not from lorasurgeon:

    convert_lora_to_gguf.py stores one `adapter.lora.alpha = lparams["lora_alpha"]` (L427-428, L528) and the
    factors as they are (`self._rank = B.shape[-1]`, L53); src/llama-adapter.h L53-57:
        const float rank  = (float) b->ne[0];
        const float scale = alpha ? adapter_scale * alpha / rank : adapter_scale;
    (b->ne[0] is the innermost GGUF dimension: B's column count, the rank), applied as scale·B@(A@x) in
    src/llama-graph.cpp build_lora_mm (adapter_scale 1.0, the default).
    """
    rank = b.shape[1]
    scale = lora_alpha / rank if lora_alpha else 1.0
    return scale * (b.double() @ a.double())


def test_llamacpp_reads_an_extract_like_adapter_wrong_and_the_fold_right() -> None:
    torch.manual_seed(0)
    facts = extract_like(PLAIN)
    factors = {m.path: (torch.randn(m.rank, 32), torch.randn(48, m.rank)) for m in facts.modules}
    peft = {m.path: m.scale * (factors[m.path][1].double() @ factors[m.path][0].double()) for m in facts.modules}

    def error(delta: torch.Tensor, path: str) -> float:
        return float((delta - peft[path]).norm() / peft[path].norm())

    before = {m.path: error(llamacpp_delta(*factors[m.path], facts.lora_alpha), m.path) for m in facts.modules}
    assert max(before.values()) == pytest.approx(1.0) and sum(e > 0.1 for e in before.values()) == 4
    form = single_alpha(facts)
    alpha = form.modules[0].alpha
    for written, factor in zip(form.modules, form.factors, strict=True):
        a, b = factors[written.path]
        assert error(llamacpp_delta(a, lowering.fold(b, factor), alpha), written.path) < 1e-6
    folded_facts = dataclasses.replace(
        facts,
        lora_alpha=alpha,
        alpha_pattern=False,
        modules=tuple(module(m.path, m.rank, alpha) for m in facts.modules),
    )
    assert runtimes.judge("llamacpp", facts) and runtimes.judge("llamacpp", folded_facts) == []


# --- check --target on real adapters: the facts come from the normal form ---------------------------------------

SAMPLES = Path(__file__).parent.parent / "samples"


def test_facts_of_the_samples() -> None:
    with Checkpoint.open(SAMPLES / "base") as base:
        adapter = load_adapter(SAMPLES / "adapter-rslora")
        adapter.source.close()
        facts = facts_of(adapter, base)
    assert (facts.base_vocab, facts.num_layers, facts.tied_embeddings) == (256, 2, False)
    assert facts.use_rslora and facts.rank_pattern and facts.alpha_pattern and not facts.scale_metadata
    assert (facts.r, facts.lora_alpha, facts.format, len(facts.modules)) == (8, 16.0, "peft", 14)
    down = next(m for m in facts.modules if m.path == "model.layers.0.mlp.down_proj")
    assert (down.rank, down.alpha, down.scale, down.kind, down.layer, down.name) == (
        4,
        16.0,
        8.0,
        "linear",
        0,
        "down_proj",
    )
    assert {"rank_pattern", "alpha_pattern", "use_rslora"} <= facts.config_fields


@pytest.mark.parametrize("runtime", sorted(RULES))
def test_check_target_on_the_samples(runtime: str) -> None:
    plain = lorasurgeon.check(SAMPLES / "base", [SAMPLES / "adapter-lora"], target=runtime)
    assert bool(plain.errors) == (runtime == "diffusers"), [
        f.message for f in plain.errors
    ]  # a PEFT file's scales are in adapter_config.json
    patterned = lorasurgeon.check(SAMPLES / "base", [SAMPLES / "adapter-rslora"], target=runtime)
    assert bool(patterned.errors) == (runtime != "peft")
    for finding in patterned.errors:
        rule_id = re.search(rf"{runtime} rule ([\w.-]+):", finding.message)
        assert rule_id is not None and finding.message.startswith(f"{SAMPLES / 'adapter-rslora'}: ")
        rule = next(r for r in RULES[runtime] if r.id == rule_id.group(1))
        assert rule.source in finding.message and rule.versions in finding.message
        assert finding.adapter_key is None or f"{finding.adapter_key}: " in finding.message


def test_cli_check_target(capsys: pytest.CaptureFixture[str]) -> None:
    base, lora, rslora = (str(SAMPLES / n) for n in ("base", "adapter-lora", "adapter-rslora"))
    code, _, err = run_cli(["check", base, lora, "--target", "vllm", "--max-lora-rank", "8"], capsys)
    assert code == 0 and "vllm reads it as PEFT does" in err
    code, _, err = run_cli(["check", base, rslora, "--target", "vllm"], capsys)
    assert code == 1 and "vllm rule vllm.scale" in err
    code, _, err = run_cli(["check", base, rslora, "--target", "vllm", "--reads-patterns"], capsys)
    assert code == 0, err  # vLLM 0.33 reads rank_pattern and alpha_pattern
    code, out, _ = run_cli(["check", base, rslora, "--target", "llamacpp", "--json"], capsys)
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and len(doc["findings"]) == 14
    assert all("llamacpp rule llamacpp.scale" in f["message"] and f["adapter_key"] for f in doc["findings"])
    code, _, err = run_cli(["check", base, lora, "--target", "vllm", "--max-lora-rank", "24"], capsys)
    assert code == 2 and "vLLM refuses --max-lora-rank 24: it must be one of 1, 8, 16" in err
    code, _, err = run_cli(["check", base, lora, "--target", "llamacpp", "--world-size", "2"], capsys)
    assert code == 2 and "--world-size is no server option of llamacpp" in err
    code, _, err = run_cli(["check", base, lora, "--target", "peft", "--peft-version", "0.x"], capsys)
    assert code == 2 and "--peft-version 0.x: expected a release such as 0.14" in err
