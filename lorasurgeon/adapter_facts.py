"""AdapterFacts: a small, format-independent description of an adapter, for the runtime rules (runtimes.py).

The caller builds it from the normal form (adapter.Adapter and its config) plus what it knows of the base
model (vocabulary size, layer count, tied embeddings). Nothing here reads files or tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ModuleKind = Literal["linear", "conv", "embedding"]
AdapterFormat = Literal["peft", "kohya", "diffusers"]

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
