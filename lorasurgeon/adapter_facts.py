"""AdapterFacts: a small, format-independent description of an adapter, for the runtime rules (runtimes.py).

`facts_of` builds it from the normal form (adapter.Adapter and its config) plus what the base's headers and
config.json say (vocabulary size, layer count, tied embeddings); `config_facts` reads the config-level fields
from an adapter_config.json, for an adapter about to be written as well. No tensor data is read.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorasurgeon.adapter import Adapter, AdapterFormat, LoraModule
from lorasurgeon.adapter import Kind as ModuleKind
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.formats import states_scales
from lorasurgeon.formats.architectures import INPUT_EMBEDDINGS
from lorasurgeon.ties import tied_weights

# Config fields of PEFT variants that some runtimes refuse (runtime_rules.py), reported when set.
VARIANTS = ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")
ADDED_TOKENS = "added_tokens.json"  # a tokenizer's added tokens, which PEFT saves beside an adapter

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class ModuleFacts:
    """One LoRA module. `path` is its path in the base model ("model.layers.0.self_attn.q_proj", no PEFT
    prefix); `rank` is A's row count as stored; `alpha` the alpha PEFT resolves for it (alpha_pattern
    included); `scale` the factor PEFT applies (alpha/rank, alpha/√rank under rsLoRA). `bias`: the module has
    a lora_B bias; `vocab`: for an embedding, the rows it addresses (A's columns)."""

    path: str
    kind: ModuleKind
    rank: int
    alpha: float
    scale: float
    dora: bool = False
    bias: bool = False
    vocab: int | None = None

    @property
    def layer(self) -> int | None:
        """The block index in the path (the first `.<digits>.`), or None outside the repeated blocks."""
        found = _LAYER.search(self.path)
        return int(found.group(1)) if found else None

    @property
    def name(self) -> str:
        """The last path component ("q_proj"): the "layer type" that TGI and LoRAX batch across blocks."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterFacts:
    """Everything the runtime rules look at, for one adapter.

    Config: `r`, `lora_alpha`, `use_rslora`, whether `rank_pattern` / `alpha_pattern` are non-empty,
    `modules_to_save`, `init_lora_weights`, `bias` ("none" | "all" | "lora_only"), `peft_type`, and
    `variants`: the names of other variant fields that are set (alora_invocation_tokens, layer_replication,
    use_bdlora, use_qalora, ...). `config_fields`: the config keys set to a non-default value (PEFT version
    rules). Content: `full_tensors` are tensors that replace base tensors (modules_to_save copies, saved
    embeddings, biases, norms), by base tensor name; `trainable_tokens` the modules with PEFT trainable-token
    rows. Base: `base_vocab`, `num_layers`, `tied_embeddings` (lm_head shares the input embedding);
    `added_tokens` counts tokens past the base vocabulary (added_tokens.json ids ≥ base_vocab, embedding rows
    past it). `scale_metadata`: the file states its scales (a PEFT config; diffusers' lora_adapter_metadata;
    kohya alphas); False for a diffusers-format file that carries neither.
    """

    modules: tuple[ModuleFacts, ...]
    format: AdapterFormat = "peft"
    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: bool = False
    alpha_pattern: bool = False
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True
    bias: str = "none"
    variants: tuple[str, ...] = ()
    config_fields: frozenset[str] = frozenset()
    full_tensors: tuple[str, ...] = ()
    trainable_tokens: tuple[str, ...] = ()
    base_vocab: int | None = None
    num_layers: int | None = None
    tied_embeddings: bool = False
    added_tokens: int = 0
    scale_metadata: bool = True

    @property
    def max_rank(self) -> int:
        """The largest module rank (the config's r when there are no modules)."""
        return max((m.rank for m in self.modules), default=self.r)


def facts_of(adapter: Adapter, base: Checkpoint | None = None, paths: Sequence[str] | None = None) -> AdapterFacts:
    """The facts of `adapter` (modules named by `paths` when given, else by their own names), with the base's when
    `base` is given (a runtime rule that needs them passes without them)."""
    names = list(paths) if paths is not None else [m.module for m in adapter.modules]
    modules = tuple(module_facts(m, name) for m, name in zip(adapter.modules, names, strict=True))
    ranks = Counter(m.rank for m in adapter.modules).most_common(1)
    alphas = Counter(m.alpha for m in adapter.modules).most_common(1)
    defaults = {"r": ranks[0][0] if ranks else 8, "lora_alpha": alphas[0][0] if alphas else 8.0}
    vocab = base_vocab(base) if base is not None else None
    return AdapterFacts(
        modules,
        format=adapter.format,
        **config_facts({**defaults, **adapter.config}),
        use_rslora=adapter.use_rslora,
        modules_to_save=tuple(adapter.saved_modules),
        full_tensors=tuple(f"{r.module}.{r.param}" for r in adapter.replacements),
        trainable_tokens=tuple(t.module for t in adapter.token_rows),
        base_vocab=vocab,
        num_layers=_layers(base.config) if base is not None and base.config else None,
        tied_embeddings=base is not None and tied(base),
        added_tokens=_added_tokens(adapter, vocab),
        scale_metadata=states_scales(adapter),
    )


def module_facts(module: LoraModule, path: str) -> ModuleFacts:
    """One module's facts; an embedding's `vocab` is A's column count (A is (r, V))."""
    vocab = module.a.shape[1] if module.kind == "embedding" else None
    dora, bias = module.magnitude is not None, module.bias is not None
    return ModuleFacts(path, module.kind, module.rank, module.alpha, module.scale, dora, bias, vocab)


def config_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """The AdapterFacts fields an adapter_config.json decides (PEFT's defaults where a field is absent)."""
    set_fields = frozenset(k for k, v in config.items() if v not in (None, False, [], {}, ""))
    return {
        "peft_type": str(config.get("peft_type", "LORA")),
        "r": int(config.get("r", 8)),
        "lora_alpha": float(config.get("lora_alpha", 8)),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "init_lora_weights": config.get("init_lora_weights", True),
        "bias": str(config.get("bias", "none")),
        "variants": tuple(v for v in VARIANTS if v in set_fields),
        "config_fields": set_fields,
    }


def base_vocab(base: Checkpoint) -> int | None:
    """The base's vocabulary: config.json's vocab_size, else the input embedding's rows."""
    size = (base.config or {}).get("vocab_size")
    if isinstance(size, int):
        return size
    embed = next(
        (t for n, t in base.tensors.items() if n.rpartition(".")[0].rpartition(".")[2] in INPUT_EMBEDDINGS), None
    )
    return embed.shape[0] if embed is not None and embed.shape else None


def tied(base: Checkpoint) -> bool:
    """Whether transformers ties the base's lm_head to its input embedding on load (ties.tied_weights: from the
    architecture's own table, whether the checkpoint stores the head or not)."""
    ties = tied_weights(base)
    return any(t.rsplit(".", 2)[-2] == "lm_head" for t in (*ties.sources, *ties.stored) if "." in t)


def _layers(config: Mapping[str, Any]) -> int | None:
    count = config.get("num_hidden_layers", config.get("n_layer"))
    return count if isinstance(count, int) else None


def _added_tokens(adapter: Adapter, vocab: int | None) -> int:
    """Tokens past the base vocabulary in the added_tokens.json saved beside the adapter (all of them when the
    base's vocabulary is unknown)."""
    path = adapter.path / ADDED_TOKENS if adapter.path.is_dir() else adapter.path.with_name(ADDED_TOKENS)
    if not path.is_file():
        return 0
    try:
        ids = json.loads(path.read_text()).values()
    except (OSError, ValueError, AttributeError):
        return 0
    return sum(1 for i in ids if isinstance(i, int) and (vocab is None or i >= vocab))
