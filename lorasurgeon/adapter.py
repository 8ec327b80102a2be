"""Adapters: read a PEFT LoRA adapter (directory or file) into one normal form, `Adapter` of `LoraModule`s.

Loading reads headers and the config only; factor tensors stay on disk until the plan or the surgery reads
them. Everything the adapter holds that lorasurgeon cannot apply exactly is refused here, by name.

Besides LoRA factors (Linear, Conv1D, ConvNd and Embedding, with DoRA magnitudes and lora_B biases), a PEFT
file holds full tensors that replace base tensors when PEFT loads it (modules_to_save, saved embeddings,
bias="all"/"lora_only") and trainable-token rows (FORMATS.md §4.3-§4.5); both are kept here by name. A kohya
file may hold LyCORIS LoHa and LoKr factors instead of LoRA ones, kept by role.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasurgeon import keys, lycoris
from lorasurgeon.checkpoint import Checkpoint, read_json, refuse_pickle
from lorasurgeon.errors import InputError, MismatchError, UnsupportedError
from lorasurgeon.header import TensorInfo
from lorasurgeon.lora_config import CONFIG_NAME, LoraConfig

WEIGHTS_NAME = "adapter_model.safetensors"

FACTOR_ROLES = (("lora_A", "lora_B", "linear"), ("lora_embedding_A", "lora_embedding_B", "embedding"))
# LyCORIS algorithms of kohya-named modules (keys.LYCORIS_ROLES) that lorasurgeon refuses, and why.
LYCORIS_REFUSED = {
    "ia3": "LyCORIS (IA)³, which multiplies the base weight by a learned vector instead of adding a ΔW",
    "glora": "LyCORIS GLoRA, whose update depends on the base weight (W·A + B), not on the adapter alone",
    "oft": "LyCORIS OFT / BOFT, which rotates the base weight (an orthogonal transform) instead of adding a ΔW",
    "full": "a LyCORIS full-weight difference (diff), which lorasurgeon does not merge yet",
    "norm": "a LyCORIS normalization-layer module (w_norm / b_norm), which lorasurgeon does not merge yet",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its path in the model, its factors on disk, and its effective scale.

    `kind` is "linear" (also transformers Conv1D), "conv" (A is (r, in, *k)) or "embedding" (A is (r, V),
    B is (d, r)); `magnitude` is the DoRA magnitude vector and `bias` the lora_B bias, when the adapter has them.
    `kind` "loha" and "lokr" are LyCORIS modules (see lycoris.py): `factors` holds their tensors by role
    (hada_w1_a, lokr_w2, ...), and `a` and `b` are both the first of them, which names the module in messages.
    """

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    kind: str = "linear"
    magnitude: TensorInfo | None = None
    bias: TensorInfo | None = None
    factors: Mapping[str, TensorInfo] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The checkpoint tensor this module changes (before prefix resolution)."""
        return f"{self.module}.weight"


@dataclass(frozen=True)
class Replacement:
    """A full tensor that replaces the base's `module`.`param` (modules_to_save, saved embedding, bias)."""

    module: str
    param: str
    tensor: TensorInfo


@dataclass(frozen=True)
class TokenRows:
    """Trainable tokens: `tensor` holds the new rows `indices` of `module`'s weight (not a delta)."""

    module: str
    tensor: TensorInfo
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter in normal form; `source` reads its factor and replacement tensors."""

    path: Path
    format: str
    config: dict[str, Any]
    modules: tuple[LoraModule, ...]
    ignored: tuple[str, ...]
    source: Checkpoint
    use_rslora: bool = False
    replacements: tuple[Replacement, ...] = ()
    token_rows: tuple[TokenRows, ...] = ()


def load_adapter(path: Path, alpha: float | None = None) -> Adapter:
    """Read a PEFT adapter directory or `.safetensors` file, or a kohya / sd-scripts LoRA file.

    The config (adapter_config.json, in the directory or beside the file) gives rank, alpha and the
    module selection; without one, `alpha` must be given and every module in the file is used.
    `alpha`, when given, replaces lora_alpha and every alpha_pattern value (kohya: every `.alpha`).
    A kohya file needs no config: its `.alpha` tensors give the scale, and a missing one means alpha = rank.
    Raises InputError (unreadable), UnsupportedError (a variant lorasurgeon cannot apply exactly),
    MismatchError (A without B, DoRA or trainable-token tensors the config does not account for).
    """
    weights, config_path = _locate(Path(path))
    if config_path is None:
        probe = Checkpoint.open(weights)
        if keys.is_kohya(probe.tensors):
            return _kohya_adapter(Path(path), probe, alpha)
        if keys.is_diffusers(probe.tensors, probe.shards[0].header.metadata):
            return _diffusers_adapter(Path(path), probe, alpha)
        probe.close()
    if config_path is None and alpha is None:
        raise InputError(
            f"{weights}: no {CONFIG_NAME} beside it, so the LoRA scale is unknown; pass --alpha "
            "(the lora_alpha it was trained with)"
        )
    config = read_json(config_path) if config_path else {}
    settings = LoraConfig.parse(config_path or weights, config, alpha)
    source = Checkpoint.open(weights)
    try:
        contents = _Contents.read(source, settings, has_config=config_path is not None)
    except Exception:
        source.close()
        raise
    return Adapter(
        Path(path),
        "peft",
        config,
        tuple(contents.modules),
        tuple(contents.ignored),
        source,
        settings.use_rslora,
        tuple(contents.replacements),
        tuple(contents.rows),
    )


def _kohya_adapter(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    """A kohya / sd-scripts file (FORMATS.md §5.1, §5.3): `N.lora_down.weight`, `N.lora_up.weight`, `N.alpha`,
    or LyCORIS LoHa (`N.hada_*`) and LoKr (`N.lokr_*`) factors with the same `N.alpha`; a LyCORIS DoRA
    `N.dora_scale` (on any of them) is the module's magnitude.

    Module names stay kohya names (`lora_unet_..._to_q`); the plan resolves them against the base.
    """
    try:
        parts: dict[str, dict[str, TensorInfo]] = {}
        for info in source:
            module, role = keys.split_kohya_key(info.name)
            if role is None:
                raise UnsupportedError(
                    f"{source.path}: {info.name} is not a LoRA, LoHa or LoKr tensor of a kohya / LyCORIS file, "
                    "so lorasurgeon cannot merge it"
                )
            parts.setdefault(module, {})[role] = info
        modules = tuple(_kohya_module(source, module, found, alpha) for module, found in parts.items())
    except Exception:
        source.close()
        raise
    return Adapter(path, "kohya", {}, modules, (), source)


def _kohya_module(source: Checkpoint, module: str, found: dict[str, TensorInfo], alpha: float | None) -> LoraModule:
    algorithms: dict[str, TensorInfo] = {}  # algorithm -> its first tensor, which names it
    tucker = "lora_mid.weight" in found  # a LoCon whose down and up factors meet through a k×k core
    for role, info in found.items():
        if role not in ("alpha", "dora_scale"):
            lora = "locon-tucker" if tucker else "lora"
            algorithms.setdefault(keys.LYCORIS_ROLES.get(role, lora), info)
    refused = next((name for name in algorithms if name in LYCORIS_REFUSED), None)
    if refused is not None:
        raise UnsupportedError(f"{source.path}: {algorithms[refused].name} is {LYCORIS_REFUSED[refused]}")
    if len(algorithms) > 1:
        first, second = list(algorithms.values())[:2]
        raise MismatchError(f"{source.path}: {first.name} and {second.name} are of different algorithms in one module")
    kind = next(iter(algorithms), "lora")
    if kind != "lora":
        return _lycoris_module(source, module, kind, found, alpha)
    if "lora_down" not in found or "lora_up" not in found:
        missing = "lora_up" if "lora_down" in found else "lora_down"
        raise MismatchError(f"{source.path}: {next(iter(found.values())).name} has no matching {missing} tensor")
    down, up = found["lora_down"], found["lora_up"]
    rank = down.shape[0] if down.shape else 0
    stored = found.get("alpha")
    value = alpha if alpha is not None or stored is None else _scalar(source, stored)
    value = value or float(rank)  # sd-scripts: a missing, None or 0 alpha means alpha = rank (scale 1)
    if rank <= 0 or not math.isfinite(value):
        raise InputError(f"{source.path}: {down.name} has rank {rank} and alpha {value}, which give no scale")
    kind = "conv" if len(down.shape) > 2 else "linear"
    return LoraModule(module, down, up, rank, value, value / rank, False, kind, found.get("dora_scale"))


def _lycoris_module(
    source: Checkpoint, module: str, kind: str, found: dict[str, TensorInfo], alpha: float | None
) -> LoraModule:
    """A LoHa, LoKr or Tucker LoCon module: scale = alpha / rank as LyCORIS computes it (a missing or 0 alpha means
    alpha = rank; a LoKr of two full matrices has rank 1 and scale 1). Shapes are checked against the base by the
    plan."""
    roles = (*keys.LYCORIS_ROLES, "lora_down", "lora_up")  # in this order: the first names the module
    factors = {role: found[role] for role in roles if role in found and role != "dora_scale"}
    rank = lycoris.layout(kind, {role: info.shape for role, info in factors.items()}).rank
    stored = found.get("alpha")
    value = alpha if alpha is not None or stored is None else _scalar(source, stored)
    if rank is None:  # a LoKr of two full matrices ("use scale = 1", whatever the alpha), or a misfit the plan names
        rank, value = 1, 1.0
    value = value or float(rank)
    first = next(iter(factors.values()))
    if not math.isfinite(value):
        raise InputError(f"{source.path}: {first.name} has alpha {value}, which gives no scale")
    magnitude = found.get("dora_scale")
    return LoraModule(module, first, first, rank, value, value / rank, False, kind, magnitude, factors=factors)


def _scalar(source: Checkpoint, info: TensorInfo) -> float:
    """The value of a one-element `.alpha` tensor."""
    if info.numel != 1 or info.dtype not in ("F64", "F32", "F16", "BF16", "I64", "I32"):
        raise InputError(f"{source.path}: {info.name} must be one number, not {info.dtype} {list(info.shape)}")
    return float(source.read(info).item())


def _diffusers_adapter(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    """A diffusers LoRA file (FORMATS.md §5.6): `<component>.<module path>.lora_A/lora_B.weight`.

    The scale is each component's LoraConfig from `lora_adapter_metadata`, else `<module>.alpha` tensors,
    else 1 (alpha = rank), as diffusers loads it; `alpha` overrides them all. Module paths keep their
    component (`unet.down_blocks...`), which the plan strips to find the tensor in a `unet/` checkpoint.
    """
    try:
        configs = _diffusers_configs(source)
        alphas: dict[str, float] = {}
        parts: dict[str, dict[str, TensorInfo]] = {}
        for info in source:
            key = keys.split_peft_key(info.name)
            if info.name.endswith(".alpha"):
                alphas[info.name.removesuffix(".alpha")] = _scalar(source, info)
            elif key.role in ("replacement", "trainable_tokens_delta"):
                raise UnsupportedError(f"{source.path}: {info.name} is not a LoRA tensor of a diffusers file")
            else:
                parts.setdefault(key.module, {})[key.role] = info
        modules = []
        for module, found in parts.items():
            a, b, kind = _factors(source.path, found)
            component, _, inner = module.partition(".")
            default = {"r": a.shape[0], "lora_alpha": alphas.get(module, a.shape[0])}
            default |= {"use_dora": "lora_magnitude_vector" in found, "lora_bias": "lora_B_bias" in found}
            settings = LoraConfig.parse(source.path, configs.get(component, default), alpha)
            lora = _module(source.path, settings, inner, found, (a, b, kind), has_config=True)
            modules.append(dataclasses.replace(lora, module=module))
    except Exception:
        source.close()
        raise
    return Adapter(path, "diffusers", {}, tuple(modules), (), source)


def _diffusers_configs(source: Checkpoint) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` (`{"unet.r": 4, "unet.lora_alpha": 8, ...}`) as one LoraConfig per component."""
    raw = source.shards[0].header.metadata.get(keys.DIFFUSERS_METADATA)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise InputError(f"{source.path}: metadata {keys.DIFFUSERS_METADATA} is not a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for name, value in doc.items():
        component, _, field = str(name).partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for an adapter directory or file."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())]
        for folder in candidates:
            if (folder / WEIGHTS_NAME).is_file():
                config = folder / CONFIG_NAME
                return folder / WEIGHTS_NAME, config if config.is_file() else None
        refuse_pickle(path / "adapter_model.bin")  # the legacy name, if that is all there is
        raise InputError(f"{path}: holds no {WEIGHTS_NAME}")
    refuse_pickle(path)
    config = path.parent / CONFIG_NAME
    return path, config if config.is_file() else None


@dataclass
class _Contents:
    """What an adapter file holds, sorted by role (mutable only while it is being read)."""

    modules: list[LoraModule]
    ignored: list[str]
    replacements: list[Replacement]
    rows: list[TokenRows]

    @classmethod
    def read(cls, source: Checkpoint, settings: LoraConfig, has_config: bool) -> _Contents:
        contents = cls([], [], [], [])
        parts: dict[str, dict[str, TensorInfo]] = {}
        for info in source:
            key = keys.split_peft_key(info.name)
            if key.role == "replacement":
                contents.replacements.append(Replacement(key.module, key.param, info))
            elif key.role == "trainable_tokens_delta":
                indices = settings.rows_for(source.path, key.module, info)
                contents.rows.append(TokenRows(key.module, info, indices))
            else:
                parts.setdefault(key.module, {})[key.role] = info
        for module, found in parts.items():
            a, b, kind = _factors(source.path, found)
            if has_config and not settings.selects(module):
                contents.ignored.extend(sorted(info.name for info in found.values()))
                continue
            contents.modules.append(_module(source.path, settings, module, found, (a, b, kind), has_config))
        return contents


def _factors(where: Path, found: dict[str, TensorInfo]) -> tuple[TensorInfo, TensorInfo, str]:
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


def _module(
    where: Path,
    settings: LoraConfig,
    module: str,
    found: dict[str, TensorInfo],
    factors: tuple[TensorInfo, TensorInfo, str],
    has_config: bool,
) -> LoraModule:
    a, b, kind = factors
    magnitude, bias = found.get("lora_magnitude_vector"), found.get("lora_B_bias")
    if has_config and (magnitude is not None) != settings.use_dora:
        problem = "has no lora_magnitude_vector" if magnitude is None else "has a DoRA magnitude vector"
        raise MismatchError(f"{where}: {module} {problem} but {CONFIG_NAME} says use_dora={settings.use_dora}")
    if has_config and bias is not None and not settings.lora_bias:
        raise MismatchError(f"{where}: {bias.name} is a lora_B bias but {CONFIG_NAME} says lora_bias=false")
    rank, alpha = settings.rank_alpha(module) if has_config else (a.shape[0], settings.alpha)
    scale = alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank
    return LoraModule(module, a, b, rank, alpha, scale, settings.fan_in_fan_out, kind, magnitude, bias)
