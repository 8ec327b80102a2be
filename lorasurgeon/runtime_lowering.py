"""`convert --for RUNTIME`: the lowering plan of runtimes.py carried out on an adapter being converted.

conversion.py writes every adapter in the single-alpha form (formats.scale_form), which is the "fold" lowering.
This module adds the rest: the one rank every module is padded to ("uniform"), the modules the source lacks
("token_rows": PEFT trainable-token rows as an embedding LoRA, plus an lm_head LoRA when the base ties lm_head to
the embedding, since PEFT's trainable tokens change both; "fill_layers": zero modules for the layers that lack a
layer type), the config fields that select them, and the check that the output passes every rule of the runtime
(`verify`, run on the facts of what is about to be written). What no exact lowering fixes is refused by name
before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lorasurgeon import runtimes
from lorasurgeon.adapter import Adapter, LoraModule
from lorasurgeon.adapter_facts import AdapterFacts, ModuleFacts, config_facts, facts_of
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, Option, UnsupportedError
from lorasurgeon.formats.architectures import EMBEDDINGS, tensor_candidates
from lorasurgeon.formats.peft import factor_keys
from lorasurgeon.formats.peft_config import module_selected
from lorasurgeon.formats.writing import Converted
from lorasurgeon.header import TensorInfo, torch_dtype
from lorasurgeon.ties import tied_weights

if TYPE_CHECKING:
    import torch

# The format each runtime reads: diffusers reads its own files (and kohya's), every other runtime PEFT directories.
READS = {"diffusers": ("diffusers", "kohya")}
LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Added:
    """A module OUT holds that the source does not: factors in memory (A (r, in) or (r, V), B (out, r) or (d, r))
    whose ΔW at `scale` is the lowering's (1 for token rows; 0 for a zero module)."""

    path: str
    kind: Literal["linear", "embedding"]
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Retarget:
    """The lowering for `runtime`: its plan, the `rank` every module is padded to (None: each keeps its own), the
    modules it adds, and the source's facts."""

    runtime: str
    server: Mapping[str, Any]
    plan: runtimes.LoweringPlan
    rank: int | None
    added: tuple[Added, ...]
    facts: AdapterFacts

    @property
    def tokens_lowered(self) -> bool:
        return "token_rows" in self.plan.steps


def target_format(runtime: str, to: str | None) -> str:
    """The format written for `runtime` (`to`, or the one it reads); LorasurgeonError when it does not read `to`."""
    runtimes.rules_for(runtime)
    reads = READS.get(runtime, ("peft",))
    if to is not None and to not in reads:
        raise LorasurgeonError(
            Option("to", to), f" is not what {runtime} reads; it reads {' or '.join(reads)} adapters"
        )
    return to or reads[0]


def prepare(
    adapter: Adapter,
    modules: Sequence[LoraModule],
    names: Sequence[str],
    base_path: Path | None,
    runtime: str,
    server: Mapping[str, Any],
) -> Retarget:
    """Judge the source for `runtime` (named `names`, read against BASE when given) and build what its lowering adds.

    Raises UnsupportedError naming what no exact lowering fixes, and LorasurgeonError when a lowering needs BASE
    (trainable-token rows are new rows, not deltas; zero modules need the shapes) and none is given.
    """
    selected = dataclasses.replace(adapter, modules=tuple(modules))
    if base_path is None:
        facts = facts_of(selected, None, names)
        plan = runtimes.plan_lowering(runtime, facts, **server)
        if {"token_rows", "fill_layers"} & set(plan.steps):
            raise LorasurgeonError(
                f"{adapter.path}: lowering it for {runtime} writes new LoRA modules ({', '.join(plan.steps)}), "
                "whose factors come from the base's tensors; pass ",
                Option("base"),
            )
        return Retarget(runtime, server, plan, _rank(runtime, plan, facts, (), server), (), facts)
    with Checkpoint.open(base_path) as base:
        facts = facts_of(selected, base, names)
        plan = runtimes.plan_lowering(runtime, facts, **server)
        added = _token_rows(adapter, base, names) if "token_rows" in plan.steps else []
        added += _zero_modules(facts, base, plan.fill, modules)
    if added:  # the added modules may call for more (a rank of their own, under a reader of one config r)
        with_added = dataclasses.replace(
            facts,
            modules=(*facts.modules, *(_facts(a, float(a.rank)) for a in added)),
            trainable_tokens=() if "token_rows" in plan.steps else facts.trainable_tokens,
        )
        again = runtimes.plan_lowering(runtime, with_added, **server).steps
        plan = dataclasses.replace(plan, steps=tuple(dict.fromkeys((*plan.steps, *again))))
    return Retarget(runtime, server, plan, _rank(runtime, plan, facts, added, server), tuple(added), facts)


def _facts(added: Added, alpha: float, rank: int | None = None) -> ModuleFacts:
    """An added module's facts, at `rank` (its own when None) under the one `alpha`."""
    vocab = int(added.a.shape[1]) if added.kind == "embedding" else None
    rank = rank or added.rank
    return ModuleFacts(added.path, added.kind, rank, alpha, alpha / rank, vocab=vocab)


def _rank(
    runtime: str, plan: runtimes.LoweringPlan, facts: AdapterFacts, added: Sequence[Added], server: Mapping[str, Any]
) -> int | None:
    if not plan.uniform:
        return None
    return runtimes.uniform_rank(runtime, [m.rank for m in facts.modules] + [a.rank for a in added], **server)


def _token_rows(adapter: Adapter, base: Checkpoint, names: Sequence[str]) -> list[Added]:
    """Each trainable-token module as an embedding LoRA whose rows are new − old (lowering.token_rows_to_lora), and
    each weight the base ties to it (ties.tied_weights: lm_head, ...) as a Linear LoRA of the same rows, since
    PEFT's trainable tokens change tied weights too."""
    from lorasurgeon.lowering import token_rows_to_lora

    ties = tied_weights(base)
    out = []
    for rows in adapter.token_rows:
        if rows.module in names:
            raise UnsupportedError(
                f"{adapter.path}: {rows.tensor.name}: {rows.module} has trainable-token rows and a LoRA, which cannot "
                "be lowered into one embedding LoRA"
            )
        info = _base_tensor(base, rows.module)
        weight, new, indices = base.read(info), adapter.source.read(rows.tensor), list(rows.indices)
        layout: Literal["embedding", "linear"] = (
            "embedding" if rows.module.rsplit(".", 1)[-1] in EMBEDDINGS else "linear"
        )
        a, b, _ = token_rows_to_lora(new, weight[indices], indices, weight.shape[0], layout)
        out.append(Added(rows.module, layout, a, b, 1.0))
        for target in sorted(t for t, source in {**ties.sources, **ties.stored}.items() if source == info.name):
            a, b, _ = token_rows_to_lora(new, weight[indices], indices, weight.shape[0], "linear")
            out.append(Added(target.removesuffix(".weight"), "linear", a, b, 1.0))
    return out


def _zero_modules(
    facts: AdapterFacts, base: Checkpoint, types: Sequence[str], modules: Sequence[LoraModule]
) -> list[Added]:
    """A zero module (A = 0, B = 0) of each layer type in `types` for every layer that lacks it, shaped by the base
    tensor it names, at the rank (and in the dtype) of the type's modules in the other layers."""
    import torch

    out = []
    for kind in types:
        present = [
            (f, m) for f, m in zip(facts.modules, modules, strict=True) if f.name == kind and f.layer is not None
        ]
        layers = {f.layer for f, _ in present}
        model, module = present[0]
        for layer in sorted(set(range(facts.num_layers or 0)) - layers):
            path = LAYER.sub(f".{layer}.", model.path, count=1)
            info = _base_tensor(base, path)
            if len(info.shape) != 2:
                raise UnsupportedError(f"{info.name}: zero modules are written for linear layers only")
            dtype = torch_dtype(module.a.dtype)
            a = torch.zeros(model.rank, info.shape[1], dtype=dtype)  # (r, in)
            out.append(Added(path, "linear", a, torch.zeros(info.shape[0], model.rank, dtype=dtype), 0.0))
    return out


def _base_tensor(base: Checkpoint, module: str) -> TensorInfo:
    names = [c for c in tensor_candidates(module, "weight") if c in base.tensors]
    if not names:
        raise UnsupportedError(f"{base.path}: has no tensor for {module}, which the lowering writes a LoRA for")
    return base.tensors[names[0]]


def added_tensors(retarget: Retarget, factors: Sequence[float]) -> list[tuple[str, torch.Tensor]]:
    """The factors of the modules the lowering adds, by their PEFT keys, padded to the one rank and folded into the
    single alpha (`factors`: each one's cᵢ, from the scale form)."""
    from lorasurgeon.lowering import lowered

    out = []
    for added, factor in zip(retarget.added, factors, strict=True):
        rank = retarget.rank or added.rank
        a_key, b_key = factor_keys(added.path, added.kind)
        out += [(a_key, lowered(added.a, "a", rank, 1.0)), (b_key, lowered(added.b, "b", rank, factor))]
    return out


def amended(config: dict[str, Any], retarget: Retarget) -> dict[str, Any]:
    """A PEFT source's (restated) config that also selects the added modules, at their rank, and no longer lists
    trainable tokens once they are LoRA rows; zero modules complete every layer, so the layer selection goes."""
    if not retarget.added and not retarget.tokens_lowered:
        return config
    out = dict(config)
    target = out.get("target_modules")
    new = [a.path for a in retarget.added if not module_selected(target, a.path)]
    if isinstance(target, str):
        out["target_modules"] = "|".join([f"(?:{target})", *(re.escape(p) for p in new)])
    elif new:
        out["target_modules"] = [*(target or []), *new]
    ranks = {f"^{re.escape(a.path)}": a.rank for a in retarget.added if a.rank != out.get("r", 8)}
    if ranks and retarget.rank is None:
        out["rank_pattern"] = {**(out.get("rank_pattern") or {}), **ranks}
    if retarget.tokens_lowered:
        out["trainable_token_indices"] = None
    if retarget.plan.fill:
        out |= {"layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}
    return out


def verify(retarget: Retarget, converted: Sequence[Converted], config: Mapping[str, Any] | None, to: str) -> None:
    """Judge the facts of what is about to be written with the runtime's rules; UnsupportedError naming every
    rule it would still break (a rank above the server's limit after padding, a tied lm_head for llama.cpp, ...)."""
    modules = [
        ModuleFacts(c.name, f.kind, c.rank, c.alpha, c.alpha / c.rank, f.dora, f.bias, f.vocab)
        for c, f in zip(converted, retarget.facts.modules, strict=True)
    ]
    alpha = converted[0].alpha if converted else retarget.facts.lora_alpha
    modules += [_facts(a, alpha, retarget.rank) for a in retarget.added]
    facts = dataclasses.replace(
        retarget.facts,
        modules=tuple(modules),
        format="diffusers" if to == "diffusers" else retarget.facts.format if to == "kohya" else "peft",
        use_rslora=False,
        trainable_tokens=() if retarget.tokens_lowered else retarget.facts.trainable_tokens,
        scale_metadata=to != "peft",
        **(config_facts(config) if to == "peft" and config is not None else {}),
    )
    found = runtimes.violated(retarget.runtime, facts, **retarget.server)
    if found:
        problems = "; ".join(f"{where or 'adapter'} {what} ({rule.id})" for rule, where, what in found)
        raise UnsupportedError(f"cannot lower the adapter exactly for {retarget.runtime}: {problems}")
