"""`convert` of an adapter of a PEFT tuner other than LoRA: where the tuner's ΔW has an exact LoRA form
(tuner_kinds.LORA_FORMS: AdaLoRA, VeRA, PVeRA, RandLoRA, VB-LoRA, UniLoRA, TinyLoRA, DeLoRA, GraLoRA), its factors
are computed in fp32, one module at a time, and written as a PEFT LoRA adapter into a scratch directory, which the
conversion then reads and writes in the target format like any LoRA. Every other tuner is refused by name.

The factors' shapes are the base layer's (VeRA's shared projections are sliced to it, a Conv1D weight is stored
(in, out)), so BASE is required; the modules are placed on it as a merge places them. A module of rank 0 (an
AdaLoRA module its budget pruned away) changes nothing and is not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from lorasurgeon.adapter import Adapter
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, MismatchError, Option, UnsupportedError
from lorasurgeon.formats import load_adapter
from lorasurgeon.formats.peft import ADAPTER_WEIGHTS, PEFT_PREFIX
from lorasurgeon.formats.peft_config import ADAPTER_CONFIG
from lorasurgeon.formats.peft_config_writer import WrittenModule, adapter_config
from lorasurgeon.plan import plan_surgery
from lorasurgeon.tuner_deltas import Dims
from lorasurgeon.tuner_kinds import lora_form_refusal
from lorasurgeon.tuner_lora import Factors, lora_factors
from lorasurgeon.tuner_placement import TunerTerm
from lorasurgeon.writer import CheckpointWriter


def as_lora(adapter: Adapter, base: Path | None, scratch: contextlib.ExitStack) -> Adapter:
    """`adapter` (whose modules are a non-LoRA tuner's) as a PEFT LoRA adapter with the same ΔW, read back from a
    directory that `scratch` removes; closes `adapter.source`. Raises UnsupportedError naming a module without an
    exact LoRA form or a tensor the LoRA cannot carry, LorasurgeonError without `base`, MismatchError when a module
    does not fit it."""
    first = adapter.tuner_modules[0]
    for module in adapter.tuner_modules:
        why = lora_form_refusal(module)
        if why:
            raise UnsupportedError(f"{adapter.path}: {module.first.name}: cannot convert: {why}")
    carried = [r.tensor.name for r in adapter.replacements] + [t.tensor.name for t in adapter.token_rows]
    if carried:
        raise UnsupportedError(
            f"{adapter.path}: {carried[0]} replaces a base tensor in full, which the LoRA form of a {first.tuner} "
            "adapter does not carry; merge it instead"
        )
    if base is None:
        raise LorasurgeonError(
            f"{adapter.path}: the LoRA factors of a {first.tuner} adapter take their shapes from the base layers; "
            "pass ",
            Option("base"),
        )
    directory = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="lorasurgeon-lora-form-")))
    with Checkpoint.open(base) as checkpoint:
        terms = _placed(adapter, checkpoint, base)
    _write(adapter, terms, directory / "lora")
    adapter.source.close()
    lora = load_adapter(directory / "lora")
    return dataclasses.replace(lora, path=adapter.path)


def _placed(adapter: Adapter, checkpoint: Checkpoint, base: Path) -> list[tuple[tuple[int, ...], TunerTerm]]:
    """(base weight shape, term) of every module, placed as a merge places them (NaNs are copied, not merged)."""
    plan = plan_surgery("merge", checkpoint, [adapter], [1.0], allow_nonfinite=True)
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more problems)" if len(plan.errors) > 1 else ""
        raise MismatchError(*plan.errors[0].parts, f" (BASE {base}){more}")
    terms = [(s.tensor.shape, t) for s in plan.steps for t in s.tuners if t.param == "weight"]
    for _, term in terms:
        if term.layer not in ("linear", "conv1d"):
            raise UnsupportedError(
                f"{adapter.path}: {term.module.first.name}: cannot convert a {term.module.tuner} module of a "
                f"{term.layer} layer; convert writes the LoRA form of Linear and Conv1D modules"
            )
    return terms


def _factors(adapter: Adapter, shape: tuple[int, ...], term: TunerTerm) -> Factors:
    roles = {**adapter.shared, **term.module.factors}
    tensors = {role: adapter.source.read(info) for role, info in roles.items()}
    return lora_factors(term.module, tensors, Dims.of(shape, term.layer))


def _write(adapter: Adapter, terms: list[tuple[tuple[int, ...], TunerTerm]], out: Path) -> None:
    """The LoRA adapter directory: each module's factors in fp32 (computed once for the header's shapes and once to
    write them, so that one module's are resident at a time) and the config giving each its rank and scale."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {}
    for shape, term in terms:
        a, b, scale = _factors(adapter, shape, term)
        if a.shape[0]:
            shapes[term.module.module] = (tuple(a.shape), tuple(b.shape), scale)
    modules = [WrittenModule(path, a_shape[0], scale * a_shape[0]) for path, (a_shape, _, scale) in shapes.items()]
    conv1d = {t.layer == "conv1d" for _, t in terms}
    config = adapter_config(
        modules,
        target_modules=sorted(shapes),
        fan_in_fan_out=conv1d == {True},
        base_model=adapter.config.get("base_model_name_or_path"),
        task_type=adapter.config.get("task_type"),
    )
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for path, (a_shape, b_shape, _) in shapes.items():
        key = f"{PEFT_PREFIX}{path}"
        entries += [(f"{key}.lora_A.weight", "F32", a_shape), (f"{key}.lora_B.weight", "F32", b_shape)]
    record = {"operation": "convert", "adapter": adapter.path.name, "from": adapter.tuner, "to": "LoRA form"}
    with CheckpointWriter(out, is_dir=True, inputs=[adapter.path]) as writer:
        with writer.shard(ADAPTER_WEIGHTS, entries, {"format": "pt", "lorasurgeon": json.dumps(record)}) as stream:
            for shape, term in terms:
                if term.module.module in shapes:
                    a, b, _ = _factors(adapter, shape, term)
                    stream.write(a.to(torch.float32))
                    stream.write(b.to(torch.float32))
        writer.write_json(ADAPTER_CONFIG, config)
