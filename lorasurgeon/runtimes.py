"""What each serving runtime accepts, as tables of rules read from its source, and the judge over them.

`judge(runtime, facts, **server_options)` returns one error Finding per violated rule and module, naming the
module, the rule and where the rule was read. Each rule also names the exact lowering `convert --for`
applies to satisfy it (lowering.py), or None when nothing exact exists (refused by name).

Versions read (sources are quoted by file and line of these copies):
- vLLM 0.33.0 (PyPI wheel): vllm/lora/peft_helper.py, vllm/config/lora.py, vllm/lora/lora_model.py,
  vllm/lora/utils.py. An older vllm/lora/peft_helper.py (snapshot e745baf, release not known) refused only
  modules_to_save and DoRA and scaled every module by lora_alpha/r: no rank_pattern/alpha_pattern. Which
  release first read the patterns is not pinned down, hence the `reads_patterns` option (default False).
- SGLang 0.5.23 (PyPI wheel): python/sglang/srt/lora/{lora.py, lora_config.py, lora_manager.py, mem_pool.py}.
- llama.cpp as vendored in llama-cpp-python 0.3.36 (PyPI sdist, vendor/llama.cpp): convert_lora_to_gguf.py,
  src/llama-adapter.{h,cpp}, src/llama-graph.cpp; the same rules in ggml-org/llama.cpp convert_lora_to_gguf.py
  @ 0b03adaa and src/llama-adapter.h @ 215841fc.
- LoRAX predibase/lorax server/lorax_server/adapters/lora.py @ 03679f33, utils/sgmv.py @ 0e057f08; TGI
  huggingface/text-generation-inference server/text_generation_server/adapters/lora.py @ 45d95bdc (copied from
  LoRAX, same rules).
- diffusers 0.42.1 (installed): loaders/lora_base.py, utils/peft_utils.py. PEFT: FORMATS.md §1.2.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorasurgeon import runtime_checks as c
from lorasurgeon.adapter_facts import AdapterFacts
from lorasurgeon.errors import Finding, UnsupportedError
from lorasurgeon.runtime_rules import RULES, Lowering, Rule

# Server options per runtime and their defaults; judge refuses any other name.
OPTIONS: dict[str, dict[str, Any]] = {
    "vllm": {"max_lora_rank": 16, "reads_patterns": False},
    "sglang": {"max_lora_rank": None, "embedding_lora": True},
    "llamacpp": {},
    "tgi": {"world_size": 1},
    "lorax": {"world_size": 1},
    "diffusers": {},
    "peft": {"peft_version": None},
}


def rules_for(runtime: str) -> tuple[Rule, ...]:
    """The rule table of `runtime`; raises UnsupportedError naming an unknown runtime."""
    if runtime not in RULES:
        raise UnsupportedError(f"unknown runtime {runtime!r}: known are {', '.join(RULES)}")
    return RULES[runtime]


def server_options(runtime: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime's defaults updated with `given`; raises UnsupportedError naming an unknown option or an
    invalid vLLM max_lora_rank."""
    rules_for(runtime)
    unknown = sorted(set(given) - OPTIONS[runtime].keys())
    if unknown:
        known = ", ".join(OPTIONS[runtime]) or "none"
        raise UnsupportedError(f"{runtime} has no server option {unknown[0]!r} (its options: {known})")
    options = {**OPTIONS[runtime], **given}
    if runtime == "vllm" and options["max_lora_rank"] not in c.VLLM_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, c.VLLM_MAX_LORA_RANKS))
        raise UnsupportedError(f"vLLM refuses max_lora_rank {options['max_lora_rank']}: it must be one of {allowed}")
    return options


def judge(runtime: str, facts: AdapterFacts, **given: Any) -> list[Finding]:
    """One error Finding per violation of `runtime`'s rules, in table order: "<module>: <what is wrong> —
    <runtime> rule <id>: <description> (<source>)". Empty when the runtime serves the adapter as PEFT would."""
    options = server_options(runtime, given)
    findings = []
    for rule in rules_for(runtime):
        for where, what in rule.check(facts, options):
            message = f"{where or 'adapter'}: {what} — {runtime} rule {rule.id}: {rule.description} ({rule.source})"
            findings.append(Finding("error", message, adapter_key=where))
    return findings


def violated(runtime: str, facts: AdapterFacts, **given: Any) -> list[tuple[Rule, str | None, str]]:
    """The violations behind `judge`, as (rule, module or None, what is wrong), for `convert --for`."""
    options = server_options(runtime, given)
    return [(rule, where, what) for rule in rules_for(runtime) for where, what in rule.check(facts, options)]


@dataclass(frozen=True)
class ModuleLowering:
    """How one module is rewritten: A and B padded to `rank` (its own rank: not padded), then B′ = B·`factor`
    (1.0 leaves B bit for bit)."""

    path: str
    rank: int
    factor: float


@dataclass(frozen=True)
class LoweringPlan:
    """What `convert --for runtime` writes: one `lora_alpha`, no alpha_pattern, use_rslora false; with
    `uniform`, every module at rank `rank` (r, no rank_pattern), else each at its own rank (rank_pattern as
    before). `steps` are the lowerings the violations call for, in table order; `fill` the layer types to
    complete with zero modules in the layers that lack them (TGI / LoRAX)."""

    runtime: str
    lora_alpha: float
    rank: int
    uniform: bool
    modules: tuple[ModuleLowering, ...]
    steps: tuple[Lowering, ...]
    fill: tuple[str, ...] = ()

    def applied(self, rank: int) -> float:
        """The scale the runtime will apply to a module of `rank` in the lowered adapter (for modules the
        lowering adds, e.g. trainable tokens as embedding rows: fold them with lowering.fold_scale)."""
        return self.lora_alpha / (self.rank if self.uniform else rank)


def plan_lowering(runtime: str, facts: AdapterFacts, **given: Any) -> LoweringPlan:
    """The exact lowering that makes `runtime` serve `facts` as PEFT does (lowering.py does the tensor work).

    Raises UnsupportedError naming every violation no exact lowering fixes (DoRA, biases, full tensors,
    variants, ranks above the server's limit: resize them, ...).
    """
    options = server_options(runtime, given)
    found = violated(runtime, facts, **given)
    refused = [f"{where or 'adapter'} {what} ({rule.id})" for rule, where, what in found if rule.lowering is None]
    steps = tuple(dict.fromkeys(rule.lowering for rule, _, _ in found if rule.lowering is not None))
    uniform = "uniform" in steps
    rank = _uniform_rank(runtime, facts, options) if uniform else facts.max_rank
    limit = options.get("max_lora_rank")
    if uniform and limit is not None and rank > limit:
        refused.append(f"adapter needs rank {rank} after padding, above max_lora_rank {limit}")
    if refused:
        raise UnsupportedError(f"cannot lower the adapter exactly for {runtime}: " + "; ".join(refused))
    if not {"uniform", "fold"} & set(steps):
        same = tuple(ModuleLowering(m.path, m.rank, 1.0) for m in facts.modules)
        return LoweringPlan(runtime, facts.lora_alpha, facts.r, False, same, steps, _fill(found))
    alpha = common_alpha([m.scale * (rank if uniform else m.rank) for m in facts.modules])
    modules = tuple(
        ModuleLowering(m.path, rank if uniform else m.rank, m.scale / (alpha / (rank if uniform else m.rank)))
        for m in facts.modules
    )
    return LoweringPlan(runtime, alpha, rank, uniform, modules, steps, _fill(found))


def common_alpha(products: Sequence[float]) -> float:
    """One lora_alpha for a tensor-rank reader (ŝᵢ = α/rᵢ): the most frequent sᵢ·rᵢ, so that the modules with
    it keep B bit for bit (c = 1); ties go to the largest. Raises UnsupportedError for an empty or zero list."""
    counts = collections.Counter(p for p in products if p != 0.0)
    if not counts:
        raise UnsupportedError("every module has scale 0: there is no alpha that a runtime would read")
    best = max(counts.values())
    return max(p for p, n in counts.items() if n == best)


def _uniform_rank(runtime: str, facts: AdapterFacts, options: Mapping[str, Any]) -> int:
    """The one rank every module is padded to: the largest, rounded up to what TGI / LoRAX pad to."""
    if runtime in ("tgi", "lorax"):
        return c.sgmv_rank(facts.max_rank, options["world_size"])
    return facts.max_rank


def _fill(found: list[tuple[Rule, str | None, str]]) -> tuple[str, ...]:
    return tuple(where for rule, where, _ in found if rule.lowering == "fill_layers" and where is not None)
