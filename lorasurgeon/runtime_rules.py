"""The rule tables of runtimes.py: one per runtime, each rule read from that runtime's source (versions and
files in runtimes.py's docstring), with the versions it was read in, the predicate that checks it and the exact
lowering that satisfies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lorasurgeon import runtime_checks as c

Runtime = Literal["vllm", "sglang", "llamacpp", "tgi", "lorax", "diffusers", "peft"]
# The exact lowerings of lowering.py a rule can be satisfied by: "convert" (--to peft), "fold" (one alpha,
# B′ = B·sᵢ/ŝᵢ), "uniform" (every module padded to one rank, then fold), "token_rows" (trainable tokens as
# embedding LoRA rows), "fill_layers" (zero modules for the missing layers), "metadata" (write the scales).
Lowering = Literal["convert", "fold", "uniform", "token_rows", "fill_layers", "metadata"]


@dataclass(frozen=True)
class Rule:
    """One thing a runtime refuses or gets wrong: `check` yields each violation, `source` is where it was read and
    `versions` the releases it was read in and holds for (as far as known: earlier ones were not all checked)."""

    id: str
    description: str
    source: str
    check: c.Check
    lowering: Lowering | None = None
    versions: str = ""


# Sources are file paths (and lines) in the releases VERSIONS names.
PEFT_HELPER = "vllm/lora/peft_helper.py"
SGLANG = "python/sglang/srt/lora"
CONVERT = "convert_lora_to_gguf.py"
LORAX = "server/lorax_server/adapters/lora.py LoraWeights.load"
TGI = "server/text_generation_server/adapters/lora.py prepare_weights"


def _sgmv_rules(runtime: str, source: str, loader: str) -> tuple[Rule, ...]:
    """TGI's adapter loader is LoRAX's (its header says so): one rule list for both."""
    return (
        Rule(
            f"{runtime}.format",
            "reads PEFT adapters",
            f"{source} LoraConfig.load (peft LoraConfig)",
            c.peft_format,
            "convert",
        ),
        Rule(
            f"{runtime}.scale",
            "scale = lora_alpha / r (or /√r under use_rslora) from the config, for every module",
            f"{source} get_scaling_factor(config.lora_alpha, config.r)",
            c.applies_scale(c.global_scale(True), "lora_alpha / r"),
            "uniform",
        ),
        Rule(
            f"{runtime}.rank-padding",
            "ranks are padded to 8·world_size, or a multiple of 16 above it, and config.r is "
            "overwritten by the padded rank after the first layer type (code reading)",
            f"{source} pad_rank, config.r = padded_rank; {loader}",
            c.sgmv_padding,
            "uniform",
        ),
        Rule(
            f"{runtime}.uniform-rank",
            "one rank per layer type: the layers' factors are stacked",
            f"{source} LoraWeights.__init__ torch.stack(weights_a)",
            c.uniform_rank,
            "uniform",
        ),
        Rule(
            f"{runtime}.every-layer",
            "a layer type missing in one layer is dropped in all",
            f"{source} `if weight_name not in module_map: return None`",
            c.every_layer,
            "fill_layers",
        ),
        Rule(
            f"{runtime}.linear-only",
            "only lora_A / lora_B of linear layers are read; other tensors are unused",
            f"{source} map_weights_for_model",
            c.no_embedding_modules,
        ),
        Rule(f"{runtime}.dora", "DoRA magnitudes are unused", f"{source} map_weights_for_model", c.no_dora),
        Rule(f"{runtime}.lora-bias", "lora_B biases are unused", f"{source} map_weights_for_model", c.no_lora_bias),
        Rule(
            f"{runtime}.full-tensors", "full tensors are unused", f"{source} map_weights_for_model", c.no_full_tensors
        ),
        Rule(
            f"{runtime}.trainable-tokens",
            "trainable-token rows are unused",
            f"{source} map_weights_for_model",
            c.no_trainable_tokens,
        ),
    )


# The releases each table was read in; a rule that holds for a narrower range says so itself.
VERSIONS = {
    "vllm": "read in vLLM 0.33.0",
    "sglang": "read in SGLang 0.5.23",
    "llamacpp": "read in llama.cpp as vendored by llama-cpp-python 0.3.36 and at ggml-org/llama.cpp 0b03adaa",
    "tgi": "read in TGI at 45d95bdc",
    "lorax": "read in LoRAX at 03679f33",
    "diffusers": "read in diffusers 0.42.1; lora_adapter_metadata is read from 0.34 on",
    "peft": "read in PEFT's tags v0.6 to v0.18 and 0.21.2",
}
TABLES: dict[str, tuple[Rule, ...]] = {
    "vllm": (
        Rule(
            "vllm.format",
            "reads PEFT adapter directories",
            f"{PEFT_HELPER}:175-186 from_local_dir",
            c.peft_format,
            "convert",
        ),
        Rule(
            "vllm.max-lora-rank",
            "max(r, module ranks) ≤ max_lora_rank, one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16)",
            f"{PEFT_HELPER}:188-198; vllm/config/lora.py:27,34",
            c.vllm_max_rank,
        ),
        Rule(
            "vllm.scale",
            "scale = lora_alpha / r (/√r under use_rslora) for every module where rank_pattern / "
            "alpha_pattern are not read",
            f"{PEFT_HELPER}:113-153 (0.33.0 reads them); e745baf __post_init__",
            c.applies_scale(c.vllm_scale, "lora_alpha / r"),
            "uniform",
            "read in vLLM 0.33.0 (patterns read) and at e745baf (not read; the first release that reads them is "
            "not known, hence reads_patterns)",
        ),
        Rule(
            "vllm.modules-to-save",
            "modules_to_save only classifier / score",
            f"{PEFT_HELPER}:56-65",
            c.vllm_modules_to_save,
        ),
        Rule(
            "vllm.full-tensors",
            "only lora_A/B, lora_embedding_A/B and classifier / score tensors",
            "vllm/lora/utils.py:219-233 parse_fine_tuned_lora_name",
            c.vllm_full_tensors,
        ),
        Rule("vllm.dora", "no DoRA", f"{PEFT_HELPER}:66-67", c.no_dora),
        Rule("vllm.lora-bias", "no lora_bias", f"{PEFT_HELPER}:68-69", c.no_lora_bias),
        Rule(
            "vllm.init",
            "no PiSSA / OLoRA / CorDA / LoftQ-style init_lora_weights",
            f"{PEFT_HELPER}:70-78,89-100",
            c.vllm_init,
        ),
        Rule("vllm.alora", "no aLoRA", f"{PEFT_HELPER}:79-80", c.variant("alora_invocation_tokens", "Activated LoRA")),
        Rule(
            "vllm.layer-replication",
            "no layer_replication",
            f"{PEFT_HELPER}:81-82",
            c.variant("layer_replication", "layer replication"),
        ),
        Rule("vllm.bdlora", "no BD-LoRA", f"{PEFT_HELPER}:83-84", c.variant("use_bdlora", "block-diagonal LoRA")),
        Rule("vllm.qalora", "no QALoRA", f"{PEFT_HELPER}:85-86", c.variant("use_qalora", "QALoRA")),
        Rule("vllm.bias", "bias = none", f"{PEFT_HELPER}:199-200", c.no_bias_tensors),
        Rule(
            "vllm.trainable-tokens",
            "no trainable tokens (trainable_tokens_delta is an unsupported LoRA weight)",
            "vllm/lora/utils.py:233; vllm-project/vllm#36501",
            c.no_trainable_tokens,
            "token_rows",
        ),
        Rule(
            "vllm.extra-vocab",
            "no tokens past the base vocabulary (LoRA extra vocabulary was removed)",
            "vllm/lora/lora_model.py:160-168; vllm/config/lora.py lora_extra_vocab_size deprecation",
            c.no_added_tokens,
        ),
    ),
    "sglang": (
        Rule(
            "sglang.format",
            "reads PEFT adapter directories",
            f"{SGLANG}/lora_config.py:75-85",
            c.peft_format,
            "convert",
        ),
        Rule("sglang.peft-type", "peft_type LORA", f"{SGLANG}/lora.py:67", c.lora_type),
        Rule(
            "sglang.scale",
            "scale = lora_alpha / r for every module: no use_rslora, rank_pattern or alpha_pattern",
            f"{SGLANG}/lora.py:71; lora_config.py:42-45",
            c.applies_scale(c.global_scale(False), "lora_alpha / r"),
            "uniform",
        ),
        Rule(
            "sglang.max-lora-rank",
            "module ranks ≤ --max-lora-rank (default: the largest r of the loaded configs)",
            f"{SGLANG}/mem_pool.py:247; lora_manager.py:893-899",
            c.sglang_max_rank,
            "uniform",
        ),
        Rule("sglang.dora", "no DoRA", f"{SGLANG}/lora_manager.py:349-352", c.no_dora),
        Rule(
            "sglang.added-tokens",
            "no tokens added to the vocabulary",
            f"{SGLANG}/lora_manager.py:344-347",
            c.no_added_tokens,
        ),
        Rule(
            "sglang.embedding-lora",
            "embed_tokens / lm_head LoRA only since sgl-project/sglang#14177 (before: 'Not supported yet', #8222)",
            f"{SGLANG}/lora.py:179-193",
            c.sglang_embeddings,
        ),
        Rule(
            "sglang.lora-bias",
            "no lora_B bias (the memory pool holds lora_A / lora_B only)",
            f"{SGLANG}/mem_pool.py",
            c.no_lora_bias,
        ),
        Rule(
            "sglang.full-tensors",
            "no modules_to_save / full tensors (LoRAConfig does not read them)",
            f"{SGLANG}/lora_config.py:42-45",
            c.no_full_tensors,
        ),
        Rule(
            "sglang.trainable-tokens",
            "no trainable tokens",
            f"{SGLANG}/lora_config.py:42-45",
            c.no_trainable_tokens,
            "token_rows",
        ),
    ),
    "llamacpp": (
        Rule("llamacpp.format", "reads PEFT adapter directories", f"{CONVERT}:354-370", c.peft_format, "convert"),
        Rule(
            "llamacpp.scale",
            "one alpha; scale = lora_alpha / rank of the tensor (adapter_scale if alpha is 0): no "
            "alpha_pattern, no rsLoRA",
            f"{CONVERT}:53,427-428,528; src/llama-adapter.h:53-57",
            c.applies_scale(c.tensor_rank_scale, "lora_alpha / rank"),
            "fold",
        ),
        Rule("llamacpp.dora", "no DoRA (lora_magnitude_vector is an unexpected name)", f"{CONVERT}:472-484", c.no_dora),
        Rule("llamacpp.lora-bias", "no lora_B bias (an unexpected name)", f"{CONVERT}:472-484", c.no_lora_bias),
        Rule(
            "llamacpp.full-tensors",
            "no full tensors: embeddings / lm_head exit, norms are kept but unused at load",
            f"{CONVERT}:472-484; src/llama-adapter.cpp:290-295",
            c.no_full_tensors,
        ),
        Rule(
            "llamacpp.trainable-tokens",
            "no trainable tokens (an unexpected name)",
            f"{CONVERT}:472-484",
            c.no_trainable_tokens,
            "token_rows",
        ),
        Rule(
            "llamacpp.tied-lm-head",
            "no lm_head LoRA on a tied base",
            f"{CONVERT}:506-508; ggml-org/llama.cpp#9065",
            c.no_tied_lm_head,
        ),
    ),
    "tgi": _sgmv_rules("tgi", TGI, "text_generation_server/utils/sgmv (punica-sgmv kernel)"),
    "lorax": _sgmv_rules("lorax", LORAX, "server/lorax_server/utils/sgmv.py pad_to_min_rank (at 0e057f08)"),
    "diffusers": (
        Rule(
            "diffusers.scale-metadata",
            "without lora_adapter_metadata or alphas, every module gets alpha = rank",
            "utils/peft_utils.py:153-208 get_peft_kwargs, :491-511; loaders/lora_base.py:65",
            c.scale_metadata,
            "metadata",
        ),
    ),
    "peft": (
        Rule(
            "peft.format",
            "PeftModel.from_pretrained reads PEFT adapter directories",
            "src/peft/peft_model.py",
            c.peft_format,
            "convert",
        ),
        Rule(
            "peft.fields",
            "a config field newer than the loading PEFT is dropped with a warning",
            "src/peft/config.py (FORMATS.md §1.2)",
            c.peft_fields,
        ),
    ),
}
RULES: dict[str, tuple[Rule, ...]] = {
    runtime: tuple(dataclasses.replace(r, versions=r.versions or VERSIONS[runtime]) for r in rules)
    for runtime, rules in TABLES.items()
}
RUNTIMES = tuple(RULES)
