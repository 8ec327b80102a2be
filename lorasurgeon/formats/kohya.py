"""kohya / sd-scripts LoRA files and the LyCORIS modules they may hold: keys, reading them into the normal form, and
what a written kohya file states (`.alpha`, ss_* metadata) (shared FORMATS.md §5.1, §5.3, §5.4).

Module names stay kohya names (`lora_unet_..._to_q`): they cannot be turned back into module paths, so
`lorasurgeon.formats.kohya_names` resolves them against a base by sd-scripts' forward rule.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lorasurgeon import lycoris
from lorasurgeon.adapter import Adapter, Kind, LoraModule, Refused
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, MismatchError, Refusals, UnsupportedError
from lorasurgeon.formats.peft_config_writer import plain_alpha
from lorasurgeon.header import TensorInfo, scalar_value

# kohya / sd-scripts key suffixes -> role (FORMATS.md §5.1); any other suffix is not plain LoRA.
ROLES = {".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up", ".alpha": "alpha"}
# LyCORIS tensors of kohya-named modules (the `weight_list` of LyCORIS modules/*.py): suffix -> algorithm.
# A kohya module name holds no ".", so the suffix is everything after the first one.
LYCORIS_ROLES: dict[str, str] = {
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "loha"),
    **dict.fromkeys(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "lokr"),
    "dora_scale": "dora",
    "lora_mid.weight": "locon-tucker",
    "weight": "ia3",
    "on_input": "ia3",
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "glora"),
    **dict.fromkeys(("oft_blocks", "rescale"), "oft"),
    **dict.fromkeys(("diff", "diff_b"), "full"),
    **dict.fromkeys(("w_norm", "b_norm"), "norm"),
}
# LyCORIS algorithms that lorasurgeon refuses, and why.
LYCORIS_REFUSED = {
    "ia3": "LyCORIS (IA)³, which multiplies the base weight by a learned vector instead of adding a ΔW",
    "glora": "LyCORIS GLoRA, whose update depends on the base weight (W·A + B), not on the adapter alone",
    "oft": "LyCORIS OFT / BOFT, which rotates the base weight (an orthogonal transform) instead of adding a ΔW",
    "full": "a LyCORIS full-weight difference (diff), which lorasurgeon does not merge yet",
    "norm": "a LyCORIS normalization-layer module (w_norm / b_norm), which lorasurgeon does not merge yet",
}
# kohya component prefix -> the pipeline component it names (FORMATS.md §5.1); longest prefixes first, so that
# `lora_te1_` is not read as `lora_te_`. "": sd-scripts' Flux T5 prefix, which names no diffusers component (the T5
# is Flux's text_encoder_2 but SD3's text_encoder_3).
PREFIX_COMPONENTS: dict[str, str] = {
    "lora_unet": "unet",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "",
    "lora_te": "text_encoder",
}


def is_kohya(names: Iterable[str]) -> bool:
    """True when a file's keys are kohya / sd-scripts keys: `lora_down` / `lora_up`, or any key of a module
    named under a kohya component (`lora_unet_...`), as LyCORIS LoHa, LoKr, (IA)³, OFT, ... files are."""
    prefixes = tuple(f"{c}_" for c in PREFIX_COMPONENTS)
    return any(n.endswith((".lora_down.weight", ".lora_up.weight")) or n.startswith(prefixes) for n in names)


def split_key(key: str) -> tuple[str, str | None]:
    """`lora_unet_mid_block_attentions_0_proj_in.lora_down.weight` -> (module name, "lora_down"); a LyCORIS
    tensor's role is its suffix (`hada_w1_a`, `lokr_w2`, `dora_scale`, ...); role None for an unknown suffix."""
    for suffix, role in ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    module, _, suffix = key.partition(".")
    return module, suffix if suffix in LYCORIS_ROLES else None


def prefix_of(module: str) -> str:
    """The component prefix of a kohya module name (`lora_unet`, `lora_te1`, ...), or "" when it has none."""
    return next((c for c in PREFIX_COMPONENTS if module.startswith(c + "_")), "")


def read(path: Path, source: Checkpoint, alpha: float | None, refusals: Refusals) -> Adapter:
    """A kohya / sd-scripts file (FORMATS.md §5.1, §5.3): `N.lora_down.weight`, `N.lora_up.weight`, `N.alpha`, or
    LyCORIS LoHa (`N.hada_*`) and LoKr (`N.lokr_*`) factors with the same `N.alpha`; a LyCORIS DoRA `N.dora_scale`
    (on any of them) is the module's magnitude. `alpha`, when given, replaces every `.alpha`."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    refused: list[Refused] = []
    for info in source:
        module, role = split_key(info.name)
        if role is None:
            refusals.add(
                UnsupportedError(
                    f"{source.path}: {info.name} is not a LoRA, LoHa or LoKr tensor of a kohya / LyCORIS file, "
                    "so lorasurgeon cannot merge it"
                )
            )
            refused.append(Refused(module, "unknown", {info.name.partition(".")[2]: info}))
            continue
        parts.setdefault(module, {})[role] = info
    modules = []
    unknown = {r.module for r in refused}
    for module, found in parts.items():
        if module in unknown and set(found) == {"alpha"}:  # the alpha of a module described as unknown
            continue
        try:
            modules.append(_module(source, module, found, alpha))
        except UnsupportedError as e:
            refusals.add(e)
            refused.append(Refused(module, _algorithm(found), {r: t for r, t in found.items() if r != "alpha"}))
        except MismatchError as e:
            refusals.add(e)
            refused.append(Refused(module, "unpaired", {r: t for r, t in found.items() if r != "alpha"}))
    scalars = tuple(t.name for found in parts.values() for r, t in found.items() if r == "alpha")
    return Adapter(path, "kohya", {}, tuple(modules), source, scalars=scalars, refused=tuple(refused))


def _algorithm(found: Mapping[str, TensorInfo]) -> str:
    return next((LYCORIS_ROLES[r] for r in found if LYCORIS_ROLES.get(r, "dora") != "dora"), "lora")


def _module(source: Checkpoint, module: str, found: dict[str, TensorInfo], alpha: float | None) -> LoraModule:
    algorithms: dict[str, TensorInfo] = {}  # algorithm -> its first tensor, which names it
    tucker = "lora_mid.weight" in found  # a LoCon whose down and up factors meet through a k×k core
    for role, info in found.items():
        if role not in ("alpha", "dora_scale"):
            lora = "locon-tucker" if tucker else "lora"
            algorithms.setdefault(LYCORIS_ROLES.get(role, lora), info)
    refused = next((name for name in algorithms if name in LYCORIS_REFUSED), None)
    if refused is not None:
        raise UnsupportedError(f"{source.path}: {algorithms[refused].name} is {LYCORIS_REFUSED[refused]}")
    if len(algorithms) > 1:
        first, second = list(algorithms.values())[:2]
        raise MismatchError(f"{source.path}: {first.name} and {second.name} are of different algorithms in one module")
    kind = next(iter(algorithms), "lora")
    component = PREFIX_COMPONENTS.get(prefix_of(module), "")
    if kind in lycoris.ALGORITHMS:
        return _lycoris_module(source, module, kind, found, alpha, component)  # type: ignore[arg-type]
    if "lora_down" not in found or "lora_up" not in found:
        missing = "lora_up" if "lora_down" in found else "lora_down"
        raise MismatchError(f"{source.path}: {next(iter(found.values())).name} has no matching {missing} tensor")
    down, up = found["lora_down"], found["lora_up"]
    if len(down.shape) < 2 or len(up.shape) < 2:
        stray = down if len(down.shape) < 2 else up
        raise MismatchError(f"{source.path}: {stray.name} has shape {list(stray.shape)}, not a matrix of LoRA factors")
    rank = down.shape[0]
    stored = found.get("alpha")
    value = alpha if alpha is not None or stored is None else scalar(source, stored)
    value = value or float(rank)  # sd-scripts: a missing, None or 0 alpha means alpha = rank (scale 1)
    if rank <= 0 or not math.isfinite(value):
        raise InputError(f"{source.path}: {down.name} has rank {rank} and alpha {value}, which give no scale")
    conv: Kind = "conv" if len(down.shape) > 2 else "linear"
    return LoraModule(
        module, down, up, rank, value, value / rank, False, kind=conv, magnitude=found.get("dora_scale"),
        dora="lycoris", component=component, naming="kohya",
    )  # fmt: skip


def _lycoris_module(
    source: Checkpoint, module: str, kind: Kind, found: dict[str, TensorInfo], alpha: float | None, component: str
) -> LoraModule:
    """A LoHa, LoKr or Tucker LoCon module: scale = alpha / rank as LyCORIS computes it (a missing or 0 alpha means
    alpha = rank; a LoKr of two full matrices has rank 1 and scale 1). Shapes are checked against the base by the
    plan."""
    roles = (*LYCORIS_ROLES, "lora_down", "lora_up")  # in this order: the first names the module
    factors = {role: found[role] for role in roles if role in found and role != "dora_scale"}
    rank = lycoris.layout(kind, {role: info.shape for role, info in factors.items()}).rank
    stored = found.get("alpha")
    value = alpha if alpha is not None or stored is None else scalar(source, stored)
    if rank is None:  # a LoKr of two full matrices ("use scale = 1", whatever the alpha), or a misfit the plan names
        rank, value = 1, 1.0
    value = value or float(rank)
    first = next(iter(factors.values()))
    if not math.isfinite(value):
        raise InputError(f"{source.path}: {first.name} has alpha {value}, which gives no scale")
    return LoraModule(
        module, first, first, rank, value, value / rank, False, kind=kind, magnitude=found.get("dora_scale"),
        factors=factors, dora="lycoris", component=component, naming="kohya",
    )  # fmt: skip


def scalar(source: Checkpoint, info: TensorInfo) -> float:
    """The value of a one-element `.alpha` tensor, read without torch (a header-only report reads it too)."""
    value = scalar_value(info.dtype, source.read_bytes(info)) if info.numel == 1 else None
    if value is None or not math.isfinite(value):
        shown = f"{info.dtype} {list(info.shape)}" if value is None else str(value)
        raise InputError(f"{source.path}: {info.name} must hold one finite number, the alpha, not {shown}")
    return value


def alpha_of(module: LoraModule) -> float:
    """The float32 `.alpha` a kohya file stores for the module: scale·r, rounded to float32. A kohya file has no
    rsLoRA flag and patterns are per module anyway (FORMATS.md §5.3), so every module gets its own exact scale."""
    return float32(plain_alpha(module.rank, module.alpha, module.scale))


def float32_drift(module: LoraModule, alpha: float) -> float | None:
    """The relative change of the scale when `alpha` / r replaces it, if that changes the float32 scale.

    Readers compute alpha / r, sd-scripts in float32; every merge multiplies fp32 factors by the scale rounded to
    float32, so a float32 alpha loses nothing unless it changes that rounded scale."""
    if float32(alpha / module.rank) == float32(module.scale):
        return None
    return abs(alpha / module.rank - module.scale) / abs(module.scale)


def metadata(modules: Sequence[LoraModule], alphas: Sequence[float], source: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' minimum metadata (FORMATS.md §5.4) over a kohya source's ss_* and modelspec.* entries (not its
    sshs_* hashes, which are of the old file's bytes)."""
    kept = {k: v for k, v in source.items() if k.startswith(("ss_", "modelspec."))}
    convs = [(m.rank, a) for m, a in zip(modules, alphas, strict=True) if m.kind == "conv"]
    args = {"conv_dim": _one([r for r, _ in convs]), "conv_alpha": _one([a for _, a in convs])} if convs else {}
    return kept | {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _one([m.rank for m in modules]),
        "ss_network_alpha": _one(alphas),
        "ss_network_args": json.dumps(args),
    }


def _one(values: Sequence[float]) -> str:
    """sd-scripts' metadata value: the one value all modules share, or "Dynamic"."""
    return str(values[0]) if len(set(values)) == 1 else "Dynamic"


def float32(value: float) -> float:
    """`value` rounded to the nearest float32 (±inf past its range)."""
    try:
        return float(struct.unpack("<f", struct.pack("<f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)
