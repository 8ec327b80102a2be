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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorasurgeon import runtime_checks as c
from lorasurgeon.adapter import Adapter
from lorasurgeon.adapter_facts import AdapterFacts, facts_of
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import Finding, Option, UnsupportedError
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
    """The runtime's defaults updated with `given` (a peft_version may be a "0.14" string); raises UnsupportedError
    naming an unknown option or an invalid vLLM max_lora_rank."""
    rules_for(runtime)
    unknown = sorted(set(given) - OPTIONS[runtime].keys())
    if unknown:
        known = ", ".join(OPTIONS[runtime]) or "none"
        raise UnsupportedError(Option(unknown[0]), f" is no server option of {runtime} (its options: {known})")
    options = {**OPTIONS[runtime], **given}
    if runtime == "vllm" and options["max_lora_rank"] not in c.VLLM_MAX_LORA_RANKS:
        allowed = ", ".join(map(str, c.VLLM_MAX_LORA_RANKS))
        rank = Option("max_lora_rank", options["max_lora_rank"])
        raise UnsupportedError("vLLM refuses ", rank, f": it must be one of {allowed}")
    if isinstance(options.get("peft_version"), str):
        options["peft_version"] = _version(options["peft_version"])
    return options


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise UnsupportedError(Option("peft_version", text), ": expected a release such as 0.14")
    return int(parts[0]), int(parts[1])


def judge_adapters(
    runtime: str, adapters: Sequence[Adapter], base: Checkpoint, server: Mapping[str, Any]
) -> list[Finding]:
    """`check --target`: each adapter's facts (adapter_facts.facts_of, with the base's) judged by `runtime`'s
    rules; each finding starts with the adapter's path."""
    return [
        dataclasses.replace(f, parts=(f"{adapter.path}: ", *f.parts))
        for adapter in adapters
        for f in judge(runtime, facts_of(adapter, base), **server)
    ]


def judge(runtime: str, facts: AdapterFacts, **given: Any) -> list[Finding]:
    """One error Finding per violation of `runtime`'s rules, in table order: "<module>: <what is wrong> —
    <runtime> rule <id>: <description> (<source>; <versions>)". Empty when the runtime serves the adapter as PEFT
    would."""
    return [
        Finding.of(
            "error",
            f"{where or 'adapter'}: {what} — {runtime} rule {rule.id}: {rule.description} "
            f"({rule.source}; {rule.versions})",
            adapter_key=where,
        )
        for rule, where, what in violated(runtime, facts, **given)
    ]


def violated(runtime: str, facts: AdapterFacts, **given: Any) -> list[tuple[Rule, str | None, str]]:
    """The violations behind `judge`, as (rule, module or None, what is wrong), for `convert --for`."""
    options = server_options(runtime, given)
    return [(rule, where, what) for rule in rules_for(runtime) for where, what in rule.check(facts, options)]


@dataclass(frozen=True)
class LoweringPlan:
    """What `convert --for runtime` does beyond writing the single-alpha form (formats.scale_form), which it always
    writes: `steps` are the lowerings the violations call for, in table order; with "uniform" every module is
    padded to one rank (`uniform_rank`), with "token_rows" the trainable-token rows become LoRA rows, with
    "fill_layers" the layer types in `fill` get zero modules in the layers that lack them."""

    runtime: str
    steps: tuple[Lowering, ...]
    fill: tuple[str, ...] = ()

    @property
    def uniform(self) -> bool:
        return "uniform" in self.steps


def plan_lowering(runtime: str, facts: AdapterFacts, **given: Any) -> LoweringPlan:
    """The exact lowerings that make `runtime` serve `facts` as PEFT does (conversion and lowering.py do the work).

    Raises UnsupportedError naming every violation no exact lowering fixes (DoRA, biases, full tensors,
    variants, ranks above the server's limit: resize them, ...).
    """
    found = violated(runtime, facts, **given)
    refused = [f"{where or 'adapter'} {what} ({rule.id})" for rule, where, what in found if rule.lowering is None]
    if refused:
        raise UnsupportedError(f"cannot lower the adapter exactly for {runtime}: " + "; ".join(refused))
    steps = tuple(dict.fromkeys(rule.lowering for rule, _, _ in found if rule.lowering is not None))
    fill = tuple(where for rule, where, _ in found if rule.lowering == "fill_layers" and where is not None)
    return LoweringPlan(runtime, steps, fill)


def uniform_rank(runtime: str, ranks: Sequence[int], **given: Any) -> int:
    """The one rank every module is padded to: the largest, rounded up to what TGI / LoRAX pad to."""
    largest = max(ranks, default=1)
    if runtime in ("tgi", "lorax"):
        return c.sgmv_rank(largest, server_options(runtime, given)["world_size"])
    return largest
