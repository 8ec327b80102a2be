"""Adapter formats: the only place that knows PEFT, kohya / sd-scripts (with LyCORIS) and diffusers files.

`load_adapter` finds an adapter's files, detects its format and reads it into the normal form
(lorasurgeon.adapter), resolving there whatever the format decides: ranks, alphas and scales, the DoRA convention,
the pipeline component, how names meet a base. Strict (the default, for merge and check) it raises on anything the
merge cannot apply exactly; lenient (`strict=False`, for report) it describes the same things as findings instead,
so report and merge read adapters the same way. Module map: peft, peft_config (adapter_config.json), peft_tuners (with
peft_tuner_config, peft_tuner_additive, peft_tuner_products, peft_tuner_inventory: PEFT tuners other than LoRA), kohya,
kohya_names and sd_layouts (kohya names on Stable Diffusion layouts), diffusers, naming (names convert writes),
resolution (names against a base), architectures (transformers tables).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from lorasurgeon import hub
from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter, AdapterFormat
from lorasurgeon.checkpoint import Checkpoint, read_json, refuse_pickle
from lorasurgeon.errors import Finding, InputError, Refusals
from lorasurgeon.formats import diffusers, kohya, peft, peft_tuners
from lorasurgeon.formats.naming import COMPONENTS
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG, LoraConfig, refusal
from lorasurgeon.formats.quantization import qlora_warning
from lorasurgeon.header import FLOAT_DTYPES

__all__ = [
    "ADAPTER_FORMATS",
    "COMPONENTS",
    "AdapterFormat",
    "Detected",
    "detect",
    "load_adapter",
    "locate",
    "states_scales",
]
CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors")


def load_adapter(path: Path, alpha: float | None = None, *, strict: bool = True, scan_values: bool = False) -> Adapter:
    """Read a PEFT adapter directory or `.safetensors` file (LoRA, or another PEFT tuner such as IA3, OFT or VeRA:
    peft_tuners), a kohya / sd-scripts LoRA file or a diffusers LoRA file.

    The config (adapter_config.json, in the directory or beside the file) gives rank, alpha and the module
    selection; without one, `alpha` must be given and every module in the file is used. `alpha`, when given,
    replaces lora_alpha and every alpha_pattern value (kohya: every `.alpha`). A kohya file needs no config: its
    `.alpha` tensors give the scale, and a missing one means alpha = rank. `scan_values` reads every factor and
    counts its NaN/Inf values (`Adapter.nonfinite`). Raises InputError (unreadable, or not an adapter at all);
    with `strict`, also UnsupportedError (a variant lorasurgeon cannot apply exactly) and MismatchError (A without
    B, DoRA or trainable-token tensors the config does not account for), which `strict=False` puts in
    `Adapter.problems` instead. The caller closes `adapter.source`.
    """
    path = Path(path)
    weights, config_path = locate(path)
    refusals = Refusals(strict)
    source = Checkpoint.open(weights)
    try:
        adapter = _read(path, source, config_path, alpha, refusals)
        if scan_values:
            adapter = dataclasses.replace(adapter, nonfinite=_nonfinite(adapter))
    except BaseException:
        source.close()
        raise
    return dataclasses.replace(adapter, problems=tuple(refusals.findings))


def states_scales(adapter: Adapter) -> bool:
    """Whether the adapter's weights file itself states every module's scale, as readers that never see an
    adapter_config.json need (diffusers' loaders): kohya `.alpha` (or sd-scripts' alpha = rank), a diffusers file's
    lora_adapter_metadata or `.alpha` tensors; a PEFT file keeps its scales in adapter_config.json."""
    if adapter.format == "kohya":
        return True
    if adapter.format == "diffusers":
        return bool(adapter.scalars) or diffusers.METADATA in adapter.source.shards[0].header.metadata
    return False


def _read(path: Path, source: Checkpoint, config_path: Path | None, alpha: float | None, refusals: Refusals) -> Adapter:
    found = _format(source, config_path)
    if found == "kohya":
        return kohya.read(path, source, alpha, refusals)
    if found == "diffusers":
        return diffusers.read(path, source, alpha, refusals)
    if found == "checkpoint":
        raise not_an_adapter(source)
    config = read_json(config_path) if config_path else None
    if config is not None and peft_tuners.is_tuner_config(config):  # IA3, OFT, VeRA, ...: no LoRA factors
        return peft_tuners.read(path, source, config, config_path or path, refusals)
    if config is not None and (refused := refusal(config_path or path, config)) is not None:
        refusals.add(refused)
    if config is None and alpha is None:
        refusals.add(peft.missing_config(source.path), severity="warning")
    settings = LoraConfig.parse(config_path or source.path, config or {}, alpha)
    adapter = peft.read(path, source, settings, config, refusals)
    notes = _qlora_note(config_path, config) if config_path is not None and config is not None else ()
    return dataclasses.replace(adapter, scale_known=config is not None or alpha is not None, notes=notes)


def _qlora_note(config_path: Path, config: dict[str, object]) -> tuple[Finding, ...]:
    """The warning for an adapter trained against a quantized base (QLoRA), which adapter_config.json's base
    name or PEFT's old README record."""
    readme = config_path.parent / "README.md"
    text = readme.read_text(errors="replace") if readme.is_file() else None
    warning = qlora_warning(config, text, str(config_path.parent))
    return (Finding.of("warning", warning),) if warning else ()


def not_an_adapter(source: Checkpoint) -> InputError:
    """What a file with no LoRA factors looks like, since it is no adapter."""
    matrices = sum(1 for t in source if len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES)
    example = next(iter(source.tensors), "no tensors at all")
    return InputError(
        f"{source.path}: holds no LoRA factors (lora_A/lora_B, lora_down/lora_up or LyCORIS tensors), so it is not an "
        f"adapter; it looks like a model checkpoint ({len(source.tensors)} tensors, {matrices} matrices, e.g. "
        f"{example}). If it is a fine-tune of the base, extract an adapter from it first (extract BASE TUNED)"
    )


def locate(path: Path) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) for an adapter directory or file.

    A directory holds `adapter_model.safetensors` itself, or (PEFT's layout for a named adapter) in one
    sub-directory with its config; several named adapters and no default one must be chosen by path."""
    path = hub.resolve(path, download=False)  # a path, or a Hub repo id when nothing on disk has its name
    # lexists, not is_file: a config or weights file that is a loop, a pipe or a dangling link is read, and so
    # refused by name, rather than taken for absent.
    if not path.is_dir():
        refuse_pickle(path)
        config = path.parent / ADAPTER_CONFIG
        return path, config if os.path.lexists(config) else None
    if os.path.lexists(path / peft.ADAPTER_WEIGHTS):
        config = path / ADAPTER_CONFIG
        return path / peft.ADAPTER_WEIGHTS, config if os.path.lexists(config) else None
    named = sorted(p for p in path.iterdir() if (p / ADAPTER_CONFIG).is_file() and (p / peft.ADAPTER_WEIGHTS).is_file())
    if len(named) == 1:
        return named[0] / peft.ADAPTER_WEIGHTS, named[0] / ADAPTER_CONFIG
    if named:
        choices = ", ".join(str(p) for p in named)
        raise InputError(
            f"{path}: holds {len(named)} named adapters ({', '.join(p.name for p in named)}) and no default one, "
            f"which PEFT refuses to load as well; name the one to use: {choices}"
        )
    if (path / "adapter_model.bin").is_file():
        refuse_pickle(path / "adapter_model.bin")
    found = [name for name in CHECKPOINT_FILES if (path / name).is_file()]
    if found:
        raise InputError(
            f"{path}: is a model checkpoint directory ({found[0]}), not an adapter; an adapter directory holds "
            f"{peft.ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}"
        )
    raise InputError(f"{path}: holds no {peft.ADAPTER_WEIGHTS}, so it is not an adapter directory")


Detected = Literal["peft", "kohya", "diffusers", "checkpoint"]


def detect(path: Path) -> Detected:
    """The adapter format of `path` by the rules load_adapter reads it with, or "checkpoint" for anything that is
    no adapter; reads headers only."""
    path = hub.resolve(path, download=False)
    try:
        weights, config = locate(path)
    except InputError:
        if path.is_dir():
            return "checkpoint"
        raise
    with Checkpoint.open(weights) as ckpt:
        return _format(ckpt, config)


def _format(source: Checkpoint, config: Path | None) -> Detected:
    """A file with an adapter_config.json beside it is PEFT; otherwise its keys say (FORMATS.md §1.4, §5.1, §5.6)."""
    if config is not None:
        return "peft"
    names = list(source.tensors)
    if kohya.is_kohya(names):
        return "kohya"
    if diffusers.is_diffusers(names, source.shards[0].header.metadata):
        return "diffusers"
    return "peft" if peft.has_lora_keys(names) else "checkpoint"


def _nonfinite(adapter: Adapter) -> dict[str, int]:
    """NaN/Inf counts of every floating-point factor of the adapter's modules (only those that hold any)."""
    import torch  # here: a header-only load needs no torch

    from lorasurgeon import linalg

    factors = [f for m in adapter.modules for f in (tuple(m.factors.values()) or (m.a, m.b))]
    factors += [f for m in adapter.tuner_modules for f in m.tensors] + list(adapter.shared.values())
    counts = {}
    for factor in factors:
        if factor.is_float:
            values = adapter.source.read(factor).float()
            bad = 0 if linalg.fits(values, torch.float32) else linalg.nonfinite_count(values)
            if bad:
                counts[factor.name] = bad
    return counts
