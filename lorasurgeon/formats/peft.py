"""PEFT adapters: the on-disk keys of adapter_model.safetensors and reading them into the normal form (shared
FORMATS.md §1.4-§1.5, §4.3-§4.5).

Besides LoRA factors (Linear, Conv1D, ConvNd and Embedding, with DoRA magnitudes and lora_B biases), a PEFT file
holds full tensors that replace base tensors when PEFT loads it (modules_to_save, saved embeddings,
bias="all"/"lora_only") and trainable-token rows; both are kept by name. The config selects modules as PEFT
does; keys of unselected modules are kept apart (PEFT ignores them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasurgeon.adapter import Adapter, Kind, LoraModule, Refused, Replacement, TokenRows
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, LorasurgeonError, MismatchError, Option, Refusals
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG, LoraConfig
from lorasurgeon.formats.peft_parameters import depth_of, parameter_module, wraps_parameters
from lorasurgeon.header import TensorInfo, dtype_name

if TYPE_CHECKING:
    import torch

    from lorasurgeon.writer import CheckpointWriter

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# The suffix of a PEFT adapter key -> (the role of the tensor, the parameter of the module it changes).
PEFT_ROLES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": ("lora_A", "weight"),
    ".lora_B.weight": ("lora_B", "weight"),
    ".lora_B.bias": ("lora_B_bias", "bias"),
    ".lora_embedding_A": ("lora_embedding_A", "weight"),
    ".lora_embedding_B": ("lora_embedding_B", "weight"),
    ".lora_magnitude_vector": ("lora_magnitude_vector", "weight"),
    ".lora_magnitude_vector.weight": ("lora_magnitude_vector", "weight"),
    ".token_adapter.trainable_tokens_delta": ("trainable_tokens_delta", "weight"),
}
# (A role, B role, layer kind) of the two LoRA factor layouts; ConvNd is told from Linear by A's rank.
FACTOR_ROLES: tuple[tuple[str, str, Kind], ...] = (
    ("lora_A", "lora_B", "linear"),
    ("lora_embedding_A", "lora_embedding_B", "embedding"),
)


@dataclass(frozen=True)
class AdapterKey:
    """One PEFT adapter tensor key, split: the module path it belongs to and its role there."""

    key: str
    module: str
    role: str
    param: str


def split_key(key: str) -> AdapterKey:
    """`base_model.model.model.layers.0.q_proj.lora_A.weight` -> module `model.layers.0.q_proj`, lora_A.

    Keys that are not LoRA factors are full replacement tensors (modules_to_save, saved embeddings,
    biases): their role is "replacement" and `param` is the tensor's last name component.
    """
    bare = key.removeprefix(PEFT_PREFIX)
    for suffix, (role, param) in PEFT_ROLES.items():
        if bare.endswith(suffix):
            return AdapterKey(key, _strip_base_layer(bare[: -len(suffix)]), role, param)
    module, _, param = bare.rpartition(".")
    return AdapterKey(key, _strip_base_layer(module), "replacement", param)


def _strip_base_layer(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base_layer")


def has_lora_keys(names: list[str]) -> bool:
    """True when some key is a LoRA or trainable-token tensor of a PEFT / diffusers file."""
    # every such role's suffix holds "lora_" or "token_adapter": the substring test spares split_key on checkpoints
    return any(("lora_" in n or "token_adapter" in n) and split_key(n).role != "replacement" for n in names)


def read(
    path: Path, source: Checkpoint, settings: LoraConfig, config: dict[str, object] | None, refusals: Refusals
) -> Adapter:
    """A PEFT adapter file read with `settings` (from its adapter_config.json, or defaults when `config` is None:
    every module selected, ranks from the file)."""
    contents = _Contents(has_config=config is not None)
    parts: dict[tuple[str, int], dict[str, TensorInfo]] = {}  # (module, nesting level of a wrapped parameter)
    for info in source:
        key = split_key(info.name)
        if key.role == "replacement":
            saved_base = key.param == "weight" and ".base_layer." in info.name
            contents.replacements.append(Replacement(key.module, key.param, info, saved_base))
        elif key.role == "trainable_tokens_delta":
            try:
                indices = settings.rows_for(source.path, key.module, info)
            except LorasurgeonError as e:
                refusals.add(e)
                continue
            contents.rows.append(TokenRows(key.module, info, indices))
        else:
            depth = depth_of(info.name) if wraps_parameters(settings, key.module) else 0
            parts.setdefault((key.module, depth), {})[key.role] = info
    for (module, depth), found in parts.items():
        contents.add(source.path, settings, module, found, refusals, depth)
    return Adapter(
        path,
        "peft",
        dict(config or {}),
        tuple(contents.modules),
        source,
        use_rslora=settings.use_rslora,
        replacements=tuple(contents.replacements),
        token_rows=tuple(contents.rows),
        unselected=tuple(contents.unselected),
        saved_modules=tuple(settings.modules_to_save),
        rank_source=ADAPTER_CONFIG if config is not None else "the command line",
        tied_lora=settings.ensure_weight_tying,
        refused=tuple(contents.refused),
        target_parameters=tuple(settings.target_parameters),
    )


@dataclass
class _Contents:
    """What an adapter file holds, sorted by role (mutable only while it is being read)."""

    has_config: bool
    modules: list[LoraModule] = field(default_factory=list)
    unselected: list[LoraModule] = field(default_factory=list)
    replacements: list[Replacement] = field(default_factory=list)
    rows: list[TokenRows] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)

    def add(
        self,
        where: Path,
        settings: LoraConfig,
        module: str,
        found: dict[str, TensorInfo],
        refusals: Refusals,
        depth: int = 0,
    ) -> None:
        wrapped = self.has_config and wraps_parameters(settings, module)
        try:
            a, b, kind = factors(where, found)
            lora = read_module(where, settings, module, found, (a, b, kind), refusals, has_config=self.has_config)
            lora = parameter_module(where, settings, lora, depth) if wrapped else lora
        except LorasurgeonError as e:
            refusals.add(e)
            self.refused.append(Refused(module, "unpaired", dict(found)))
            return
        selected = not self.has_config or wrapped or settings.selects(module)
        (self.modules if selected else self.unselected).append(lora)


def factors(where: Path, found: dict[str, TensorInfo]) -> tuple[TensorInfo, TensorInfo, Kind]:
    """(A, B, kind) of one module's tensors; a factor without its partner is a MismatchError."""
    for a_role, b_role, kind in FACTOR_ROLES:
        if a_role in found and b_role in found:
            a = found[a_role]
            return a, found[b_role], "conv" if kind == "linear" and len(a.shape) > 2 else kind
        if a_role in found or b_role in found:
            have, missing = (a_role, b_role) if a_role in found else (b_role, a_role)
            raise MismatchError(f"{where}: {found[have].name} has no matching {missing} tensor")
    stray = next(iter(found.values()))
    raise MismatchError(f"{where}: {stray.name} belongs to a module that has no lora_A/lora_B factors")


def read_module(
    where: Path,
    settings: LoraConfig,
    module: str,
    found: dict[str, TensorInfo],
    lora: tuple[TensorInfo, TensorInfo, Kind],
    refusals: Refusals,
    *,
    has_config: bool = True,
) -> LoraModule:
    """One module's LoraModule: rank and alpha from `settings` (or the file's rank without a config), its DoRA
    magnitude and lora_B bias checked against the config."""
    a, b, kind = lora
    if len(a.shape) < 2 or len(b.shape) < 2:
        stray = a if len(a.shape) < 2 else b
        raise MismatchError(f"{where}: {stray.name} has shape {list(stray.shape)}, not a matrix of LoRA factors")
    magnitude, bias = found.get("lora_magnitude_vector"), found.get("lora_B_bias")
    if has_config and (magnitude is not None) != settings.use_dora:
        problem = "has no lora_magnitude_vector" if magnitude is None else "has a DoRA magnitude vector"
        refusals.add(
            MismatchError(f"{where}: {module} {problem} but {ADAPTER_CONFIG} says use_dora={settings.use_dora}")
        )
    if has_config and bias is not None and not settings.lora_bias:
        refusals.add(MismatchError(f"{where}: {bias.name} is a lora_B bias but {ADAPTER_CONFIG} says lora_bias=false"))
    rank, alpha = settings.rank_alpha(module) if has_config else (a.shape[0], settings.alpha)
    scale = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
    return LoraModule(module, a, b, rank, alpha, scale, settings.fan_in_fan_out, kind, magnitude, bias)


def missing_config(weights: Path) -> InputError:
    """The error for a PEFT-keyed file with no adapter_config.json and no alpha given."""
    return InputError(
        f"{weights}: no {ADAPTER_CONFIG} beside it, so the LoRA scale is unknown; pass ",
        Option("alpha"),
        " (the lora_alpha it was trained with)",
    )


def factor_keys(module: str, kind: str) -> tuple[str, str]:
    """PEFT's on-disk keys (FORMATS.md §1.4) of one module's A and B."""
    prefix = f"{PEFT_PREFIX}{module}"
    if kind == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def factor_tensors(module: str, kind: str, b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """One module's factors, B (out, r) and A (r, in), by their PEFT keys (embedding: A (r, V), B (d, r)
    decompose ΔWᵀ, which is (d, V))."""
    a_key, b_key = factor_keys(module, kind)
    return {a_key: a.contiguous(), b_key: b.contiguous()}


def write_adapter(
    writer: CheckpointWriter,
    factors: dict[str, torch.Tensor],
    config: dict[str, Any],
    record: dict[str, Any],
    full: dict[str, torch.Tensor],
    multipliers: Mapping[str, float],
) -> None:
    """A PEFT adapter directory through `writer`: adapter_model.safetensors ({"format": "pt"} plus our record of
    the operation) and adapter_config.json. Each factor is written in fp32 times its key's `multiplier` (formed in
    fp64, one rounding; the caller's choice of the scale the config states, formats.scale_form). `full` tensors
    (modules_to_save) are written as they are."""
    entries = [(key, "F32", tuple(t.shape)) for key, t in factors.items()]
    entries += [(key, dtype_name(t.dtype), tuple(t.shape)) for key, t in full.items()]
    metadata = {"format": "pt", "lorasurgeon": json.dumps(record)}
    with writer.shard(ADAPTER_WEIGHTS, entries, metadata) as stream:
        for key, tensor in factors.items():
            stream.write((tensor.double() * multipliers[key]).float())
        for tensor in full.values():
            stream.write(tensor)
    writer.write_json(ADAPTER_CONFIG, config)
