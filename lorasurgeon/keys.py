"""Naming tables: how adapter keys map to module paths and checkpoint tensor names, and PEFT's selection
rules (target_modules, exclude_modules, layers_to_transform, rank/alpha patterns) as PEFT applies them.

Everything here is a pure function of strings; see shared FORMATS.md §1.3-§1.5 for the rules' sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lorasurgeon import sd_names

PEFT_PREFIX = "base_model.model."
ADAPTER_FORMATS = ("peft", "kohya", "diffusers")  # what load_adapter reads and convert writes

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

# transformers model types whose projections are `Conv1D` (weights stored (in, out)), and which modules are.
# Names alone do not decide it: GPT-Neo's c_fc/c_proj and GPT-BigCode's c_attn are nn.Linear.
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
}

# First path components a checkpoint may store without: transformers' base-model prefixes, and the pipeline
# components of diffusers LoRA files (`unet.down_blocks...` for the tensors of `unet/`).
MODEL_PREFIXES = frozenset(
    {
        "transformer",
        "model",
        "base_model",
        "gpt_neox",
        "bert",
        "roberta",
        "unet",
        "text_encoder",
        "text_encoder_2",
        "prior",
    }
)
# diffusers LoRA files whose component prefix alone identifies the format; `transformer.` keys (SD3, Flux) look
# like a bare PEFT export of a GPT-2 and are only taken for diffusers with lora_adapter_metadata.
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "prior")
DIFFUSERS_METADATA = "lora_adapter_metadata"

# Module names of input and output embeddings; a tied checkpoint stores only the first (FORMATS.md §4.1).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OUTPUT_EMBEDDING = "lm_head.weight"

# Name components of the companion tensors that quantizers write beside a weight (bitsandbytes, GPTQ/AWQ, FP8).
QUANTIZED_PARTS = frozenset(
    {
        "absmax",
        "quant_map",
        "quant_state",
        "nested_absmax",
        "SCB",
        "qweight",
        "qzeros",
        "g_idx",
        "weight_scale",
        "weight_scale_inv",
        "input_scale",
    }
)

# kohya / sd-scripts key suffixes -> role (FORMATS.md §5.1); any other suffix is not plain LoRA.
KOHYA_ROLES = {".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up", ".alpha": "alpha"}
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
# Checkpoint name prefix -> the kohya prefixes its modules may carry (FORMATS.md §5.2). "" stands for a
# diffusers component file (unet/, text_encoder/, text_encoder_2/), whose names are sd-scripts' module paths.
# Layouts whose stored names are not sd-scripts' module paths (SD1/2 LDM-layout U-Nets, SDXL kohya names on a
# diffusers U-Net, OpenCLIP text encoders with fused q/k/v) are converted by sd_names.
KOHYA_PREFIXES: dict[str, tuple[str, ...]] = {
    "model.diffusion_model.": ("lora_unet",),  # SDXL single file: SAI U-Net names verbatim
    "conditioner.embedders.0.transformer.": ("lora_te1",),  # SDXL text encoder 1 (HF CLIP names)
    "cond_stage_model.transformer.": ("lora_te",),  # SD1 single file: HF CLIP text encoder
    "": ("lora_unet", "lora_te", "lora_te1", "lora_te2"),
}
KOHYA_COMPONENTS = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te")
# --component: a diffusers pipeline component or a kohya prefix -> the diffusers component (FORMATS.md §5.1, §5.7).
COMPONENTS = {
    "unet": "unet",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "transformer": "transformer",
    "prior": "prior",
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
}


@dataclass(frozen=True)
class AdapterKey:
    """One PEFT adapter tensor key, split: the module path it belongs to and its role there."""

    key: str
    module: str
    role: str
    param: str


def split_peft_key(key: str) -> AdapterKey:
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


def tensor_candidates(module: str, param: str) -> list[str]:
    """Checkpoint names that may hold `module`'s `param`, most specific first.

    transformers loads checkpoints with or without the model's base prefix (original GPT-2 files store
    `h.0.attn.c_attn.weight` for the module `transformer.h.0.attn.c_attn`), so both forms are tried.
    """
    name = f"{module}.{param}"
    first, _, rest = name.partition(".")
    candidates = [name]
    if rest and first in MODEL_PREFIXES:
        candidates.append(rest)
    return candidates


def is_conv1d(model_type: str | None, module: str) -> bool:
    """True when `module` of a `model_type` model is a transformers Conv1D (stored (in, out))."""
    return module.rpartition(".")[2] in CONV1D_MODULES.get(model_type or "", frozenset())


def module_selected(target: str | Sequence[str] | None, module: str) -> bool:
    """PEFT's target_modules / exclude_modules rule: list -> equal or dotted suffix; str -> fullmatch."""
    if target is None:
        return False
    if isinstance(target, str):
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


def layer_index(module: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer layer index in `module`, found the way PEFT >= 0.20 finds it (the first match)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", module)
            if match:
                break
    return int(match.group(1)) if match else None


def pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """The value of the first pattern key (in the file's order) that matches a dotted suffix of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def input_embedding(names: Iterable[str]) -> str | None:
    """The checkpoint name of the input embedding among `names` (`model.embed_tokens.weight`, ...), if any."""
    for name in names:
        module, _, param = name.rpartition(".")
        if param == "weight" and module.rpartition(".")[2] in INPUT_EMBEDDINGS:
            return name
    return None


def quantized_part(name: str) -> str | None:
    """The quantizer companion component in a tensor name (`...q_proj.weight.absmax` -> `absmax`), if any."""
    return next((part for part in name.split(".") if part in QUANTIZED_PARTS), None)


def under_module(names: Sequence[str] | None, module: str) -> bool:
    """PEFT's rule that a module at or below a `modules_to_save` entry is never LoRA-targeted."""
    return any(re.fullmatch(rf"(^|.*\.){re.escape(n)}($|\..*)", module) for n in names or ())


def is_kohya(names: Iterable[str]) -> bool:
    """True when a file's keys are kohya / sd-scripts keys: `lora_down` / `lora_up`, or any key of a module
    named under a kohya component (`lora_unet_...`), as LyCORIS LoHa, LoKr, (IA)³, OFT, ... files are."""
    prefixes = tuple(f"{c}_" for c in KOHYA_COMPONENTS)
    return any(n.endswith((".lora_down.weight", ".lora_up.weight")) or n.startswith(prefixes) for n in names)


def split_kohya_key(key: str) -> tuple[str, str | None]:
    """`lora_unet_mid_block_attentions_0_proj_in.lora_down.weight` -> (module name, "lora_down"); a LyCORIS
    tensor's role is its suffix (`hada_w1_a`, `lokr_w2`, `dora_scale`, ...); role None for an unknown suffix."""
    for suffix, role in KOHYA_ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    module, _, suffix = key.partition(".")
    return module, suffix if suffix in LYCORIS_ROLES else None


def kohya_names(tensor_names: Iterable[str]) -> dict[str, list[str]]:
    """sd-scripts' forward naming rule applied to every `.weight` of a checkpoint: kohya module name -> the
    checkpoint tensors it may denote (more than one: ambiguous). Never inverts `_` -> `.` (FORMATS.md §5.2).

    A tensor stored in another layout than sd-scripts trains (sd_names) is named by its path there too; the three
    q/k/v modules of a fused OpenCLIP `in_proj_weight` all denote that one tensor (sd_names.fused_rows says which rows).
    """
    tensor_names = list(tensor_names)
    names: dict[str, list[str]] = {}
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        for prefix, components in KOHYA_PREFIXES.items():
            if name.startswith(prefix):
                path = name[len(prefix) : -len(".weight")].replace(".", "_")
                for component in components:
                    names.setdefault(f"{component}_{path}", []).append(name)
    for name, component, module in sd_names.kohya_paths(tensor_names):
        found = names.setdefault(f"{component}_{module.replace('.', '_')}", [])
        if name not in found:
            found.append(name)
    return names


def kohya_component(module: str) -> str:
    """The component prefix of a kohya module name (`lora_unet`, `lora_te1`, ...), or "" when it has none."""
    return next((c for c in KOHYA_COMPONENTS if module.startswith(c + "_")), "")


def is_diffusers(names: Iterable[str], metadata: Mapping[str, str]) -> bool:
    """True for a diffusers LoRA file (FORMATS.md §5.6): PEFT keys under pipeline components, never under
    `base_model.model.`; `transformer.` components only with diffusers' own metadata."""
    components = {n.partition(".")[0] for n in names}
    if not components or any(n.startswith(PEFT_PREFIX) for n in names):
        return False
    allowed = (*DIFFUSERS_COMPONENTS, "transformer") if DIFFUSERS_METADATA in metadata else DIFFUSERS_COMPONENTS
    return components <= set(allowed)
