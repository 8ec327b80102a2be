"""What each adapter format cannot hold (DoRA magnitudes in kohya files, embedding LoRA in diffusers files,
LyCORIS factors anywhere, ...) and why, as one table, and the refusal that names the first such tensor before
anything is written (shared FORMATS.md §5.1, §5.4, §5.6).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorasurgeon.adapter import ADAPTER_FORMATS, Adapter, AdapterFormat, LoraModule
from lorasurgeon.errors import UnsupportedError

ONLY_FACTORS = "{} files hold LoRA factors only"
NO_LORA_KEY = "diffusers' loaders reject every key without 'lora' in it ('Invalid LoRA checkpoint')"
# What a target cannot hold: (target, what the tensor is) -> why.
CANNOT: dict[tuple[str, str], str] = {
    ("kohya", "dora"): "is a DoRA magnitude; kohya files keep DoRA as dora_scale in LyCORIS' convention (per "
    "output or per input, normed with an epsilon), which is not PEFT's",
    ("kohya", "bias"): "is a lora_B bias (lora_bias); kohya files have no LoRA bias",
    ("kohya", "embedding"): "is an embedding LoRA, whose ΔW is (B·A)ᵀ; kohya files have no embedding LoRA, "
    "and their readers would add lora_up @ lora_down untransposed",
    ("diffusers", "embedding"): "is an embedding LoRA; diffusers pipeline components adapt no embeddings, and "
    "lorasurgeon does not write them to diffusers files",
    ("kohya", "conv1d"): "is a transformers Conv1D LoRA (fan_in_fan_out: the weight is stored (in, out)); kohya "
    "files have no transpose flag, so their readers would add ΔW transposed",
    ("diffusers", "conv1d"): "is a transformers Conv1D LoRA (fan_in_fan_out: the weight is stored (in, out)); "
    "diffusers files are for pipeline components, which have no Conv1D layers",
    ("kohya", "replacement"): "replaces a base tensor in full (modules_to_save, a saved embedding or bias); "
    + ONLY_FACTORS.format("kohya"),
    ("diffusers", "replacement"): f"replaces a base tensor in full (modules_to_save, a saved embedding or "
    f"bias); {NO_LORA_KEY}",
    ("peft", "replacement"): "replaces a base tensor in full, and without the source's adapter_config.json "
    "nothing says which modules_to_save entry or saved embedding it is, so PEFT would ignore it",
    ("kohya", "tokens"): f"holds trainable token rows; {ONLY_FACTORS.format('kohya')}",
    **{
        (target, "lycoris"): "is a LyCORIS LoHa / LoKr / Tucker LoCon factor, whose ΔW is no product B·A: convert "
        "writes LoRA factors only (merge it instead)"
        for target in ADAPTER_FORMATS
    },
    **{
        (target, "dora_scale"): "is a kohya / LyCORIS dora_scale, which convert does not carry: its convention "
        "(per output or per input, normed with an epsilon) is not PEFT's lora_magnitude_vector"
        for target in ADAPTER_FORMATS
    },
    ("diffusers", "tokens"): f"holds trainable token rows; {NO_LORA_KEY}",
    **{
        (target, "parameter"): "is LoRA on a module's raw parameter (PEFT target_parameters, such as fused MoE "
        f"experts), which {target} files cannot hold: keep it a PEFT adapter"
        for target in ("kohya", "diffusers")
    },
}


def refusal(
    adapter: Adapter, modules: Sequence[LoraModule], to: AdapterFormat, *, tokens: bool = True
) -> UnsupportedError | None:
    """The error naming the first tensor the `to` format cannot hold, and why (trainable-token rows only when
    `tokens`: they are written as they are, not as LoRA rows)."""
    problems = [(r.tensor.name, "replacement") for r in adapter.replacements]
    if to == "peft":  # PEFT holds them all, given the source's config to say what the full tensors are
        problems = problems if not adapter.config else []
    elif tokens:
        problems += [(t.tensor.name, "tokens") for t in adapter.token_rows]
    problems = [problem for m in modules for problem in _unheld(m, to)] + problems
    if not problems:
        return None
    name, what = problems[0]
    more = f" (and {len(problems) - 1} more tensors {to} cannot hold)" if len(problems) > 1 else ""
    return UnsupportedError(f"{adapter.path}: {name} {CANNOT[to, what]}; nothing was converted{more}")


def _unheld(m: LoraModule, to: AdapterFormat) -> list[tuple[str, str]]:
    """(tensor, what it is) for the parts of one module the target cannot hold."""
    if m.factors:
        return [(m.a.name, "lycoris")]
    if m.dora == "lycoris" and m.magnitude is not None:
        return [(m.magnitude.name, "dora_scale")]
    if to == "peft":
        return []
    if m.parameter != "weight" or m.kind == "experts":
        return [(m.a.name, "parameter")]
    parts = [(m.a.name, "conv1d")] if m.fan_in_fan_out else []
    parts += [(m.a.name, "embedding")] if m.kind == "embedding" else []
    if to == "kohya":
        parts += [(m.magnitude.name, "dora")] if m.magnitude is not None else []
        parts += [(m.bias.name, "bias")] if m.bias is not None else []
    return parts
