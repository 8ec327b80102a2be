"""The non-LoRA PEFT tuner cases of the tests: each adapter built with PEFT's own config on a tiny seeded model
(a Llama with biases, a GPT-2 for transformers Conv1D, a small conv net for Conv2d), its parameters pushed off their
initial values so no tuner is the identity, saved with save_pretrained, and PEFT's own results kept as the oracle:
the state dict of merge_and_unload() and the unmerged forward. Built once per session, on first use.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import builders
import pytest
import torch

LLAMA = dict(builders.LLAMA, attention_bias=True, mlp_bias=True)  # biases: tuners that change them are tested
GPT2 = builders.GPT2
ATTN = ["q_proj", "v_proj", "down_proj"]


class ConvNet(torch.nn.Module):
    """A tiny conv net: a 3×3 and two 1×1 convs (PEFT's OFT merges 1×1 convs only exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.conv3 = torch.nn.Conv2d(8, 16, 1)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv3(self.conv2(self.conv1(x))).mean((2, 3)))


def make_model(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = (
        LlamaForCausalLM(LlamaConfig(**LLAMA))
        if arch == "llama"
        else GPT2LMHeadModel(GPT2Config(**GPT2))
        if arch == "gpt2"
        else ConvNet()
    )
    with torch.no_grad():  # transformers initialises biases to zero, which no bias merge would change
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    return model.to(dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    """One adapter to build: a PEFT config class and its arguments on a model `arch`. `slow` cases run with the
    slow tests only (the others are one or two per tuner family, conv and Conv1D included)."""

    id: str
    config: str
    kwargs: dict[str, Any]
    arch: str = "llama"
    invertible: bool = True
    prepare: Callable[[Any], None] | None = None  # edits the PEFT model before saving (e.g. AdaLoRA's budget)
    edit: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields changed after saving
    butterfly: bool = False  # give BOFT its CUDA block-diagonal op (on CPU), without which PEFT uses 1 factor
    slow: bool = True


CONV = ["conv1", "conv2", "conv3"]


def _adalora_budget(model: Any) -> None:
    """What AdaLoRA's RankAllocator leaves after pruning: masked singular values zeroed and a rank_pattern of
    kept rows; save_pretrained then saves only the kept rows of lora_A / lora_E / lora_B."""
    pattern = {}
    for name, param in model.base_model.model.named_parameters():
        if "lora_E" in name:
            keep = [i % 3 != 1 for i in range(param.shape[0])]
            if "layers.1.mlp" in name:
                keep = [False] * param.shape[0]  # a module pruned to rank 0
            with torch.no_grad():
                param[~torch.tensor(keep)] = 0.0
            pattern[name] = keep
    model.peft_config["default"].rank_pattern = pattern


_CASES = [
    Case("ia3", "IA3Config", dict(target_modules=ATTN, feedforward_modules=["down_proj"], init_ia3_weights=False)),
    Case("ia3-gpt2", "IA3Config", dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]), "gpt2"),
    Case("ia3-conv", "IA3Config", dict(target_modules=CONV, feedforward_modules=["conv2"]), "conv"),
    Case("adalora", "AdaLoraConfig", dict(target_modules=ATTN, init_r=6, target_r=4, total_step=10)),
    Case(
        "adalora-budget",
        "AdaLoraConfig",
        dict(target_modules=ATTN, init_r=6, target_r=4, total_step=10, lora_alpha=4),
        prepare=_adalora_budget,
    ),
    Case("adalora-gpt2", "AdaLoraConfig", dict(target_modules=["c_attn"], init_r=4, total_step=10), "gpt2"),
    Case("adalora-conv", "AdaLoraConfig", dict(target_modules=CONV, init_r=3, total_step=10, lora_alpha=0), "conv"),
    Case("loha", "LoHaConfig", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    Case("loha-conv", "LoHaConfig", dict(target_modules=CONV, r=2, alpha=3, use_effective_conv2d=True), "conv"),
    Case("lokr", "LoKrConfig", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    Case(
        "lokr-decomposed",
        "LoKrConfig",
        dict(target_modules=ATTN, r=1, alpha=2, decompose_both=True, rank_pattern={"q_proj": 2}, init_weights=False),
    ),
    Case("lokr-conv", "LoKrConfig", dict(target_modules=CONV, r=1, alpha=2, use_effective_conv2d=True), "conv"),
    Case("vera", "VeraConfig", dict(target_modules=ATTN, r=8, init_weights=False)),
    Case("vera-gpt2", "VeraConfig", dict(target_modules=["c_attn", "c_proj"], r=4), "gpt2"),
    Case("oft", "OFTConfig", dict(target_modules=ATTN, oft_block_size=8, init_weights=False)),
    Case(
        "oft-cayley-coft",
        "OFTConfig",
        dict(target_modules=ATTN, r=4, oft_block_size=0, use_cayley_neumann=False, coft=True, eps=0.5),
    ),
    Case("oft-shared-block", "OFTConfig", dict(target_modules=ATTN, oft_block_size=16, block_share=True)),
    Case(
        "oft-embedding",
        "OFTConfig",
        dict(target_modules=["embed_tokens"], oft_block_size=8),
        invertible=False,  # PEFT saves the embedding in full beside it (save_embedding_layers), a replacement
    ),
    Case("oft-conv", "OFTConfig", dict(target_modules=["conv2", "conv3"], oft_block_size=4), "conv"),
    Case("boft", "BOFTConfig", dict(target_modules=ATTN, boft_block_size=8, init_weights=False)),
    Case(
        "boft-butterfly",
        "BOFTConfig",
        dict(target_modules=ATTN, boft_block_size=4, boft_n_butterfly_factor=3),
        butterfly=True,
    ),
    Case("boft-conv", "BOFTConfig", dict(target_modules=CONV, boft_block_size=0, boft_block_num=2), "conv"),
    Case("fourierft", "FourierFTConfig", dict(target_modules=ATTN, n_frequency=50, init_weights=False)),
    Case("fourierft-gpt2", "FourierFTConfig", dict(target_modules=["c_attn"], n_frequency=40), "gpt2"),
    Case("ln-tuning", "LNTuningConfig", dict(target_modules=["input_layernorm", "norm"]), invertible=False),
    Case("miss", "MissConfig", dict(target_modules=ATTN, r=5, init_weights=False)),
    Case("miss-bat", "MissConfig", dict(target_modules=["q_proj", "v_proj"], r=4, init_weights="bat")),
    Case("miss-mini", "MissConfig", dict(target_modules=ATTN, r=4, mini_r=8, init_weights="mini")),
    Case("hra", "HRAConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("hra-gs", "HRAConfig", dict(target_modules=ATTN, r=3, apply_GS=True)),
    Case("hra-conv", "HRAConfig", dict(target_modules=CONV, r=2), "conv"),
    Case("randlora", "RandLoraConfig", dict(target_modules=ATTN, r=8, init_weights=False)),
    Case("randlora-gpt2", "RandLoraConfig", dict(target_modules=["c_attn", "c_fc"], r=8), "gpt2"),
    Case("shira", "ShiraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("c3a", "C3AConfig", dict(target_modules=ATTN, block_size=8, init_weights=False)),
    Case("road", "RoadConfig", dict(target_modules=ATTN, group_size=8, init_weights=False)),
    Case("road-4", "RoadConfig", dict(target_modules=ATTN, variant="road_4", group_size=4)),
    Case("delora", "DeloraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("waveft", "WaveFTConfig", dict(target_modules=ATTN, n_frequency=50, init_weights=False)),
    Case("waveft-dense", "WaveFTConfig", dict(target_modules=ATTN, n_frequency=30, use_idwt=False)),
    Case("waveft-gpt2", "WaveFTConfig", dict(target_modules=["c_attn"], n_frequency=30), "gpt2"),
    Case("gralora", "GraloraConfig", dict(target_modules=ATTN, r=8, gralora_k=2, init_weights=False)),
    Case("gralora-hybrid-gpt2", "GraloraConfig", dict(target_modules=["c_attn"], r=4, gralora_k=2, hybrid_r=2), "gpt2"),
    Case("vblora", "VBLoRAConfig", dict(target_modules=ATTN, r=4, num_vectors=16, vector_length=8)),
    Case(
        "vblora-topk-gpt2",
        "VBLoRAConfig",
        dict(target_modules=["c_attn"], r=2, num_vectors=8, vector_length=8, topk=3, save_only_topk_weights=True),
        "gpt2",
    ),
    Case("beft", "BeftConfig", dict(target_modules=ATTN, init_weights=False)),
    # Selection as PEFT applies the config: the file holds every layer's modules, the edited config selects
    # fewer (layers_to_transform, exclude_modules, a regex), and PEFT skips the keys of the others.
    Case(
        "selection-layers",
        "LoHaConfig",
        dict(target_modules=ATTN, r=2, alpha=4, init_weights=False),
        edit=dict(layers_to_transform=[1], exclude_modules=["model.layers.1.mlp.down_proj"]),
    ),
    Case(
        "selection-regex",
        "IA3Config",
        dict(target_modules=ATTN, feedforward_modules=["down_proj"], init_ia3_weights=False),
        edit=dict(target_modules=r".*\.0\.(self_attn\.q_proj|mlp\.down_proj)"),
    ),
    # Full tensors PEFT loads over the base's before merging: modules_to_save and bias="all".
    Case(
        "replacements",
        "VeraConfig",
        dict(target_modules=ATTN, r=4, bias="all", modules_to_save=["lm_head"], init_weights=False),
        invertible=False,  # the replaced tensors' old values are not in the adapter
    ),
    Case("glora", "GloraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case(
        "glora-vectors",
        "GloraConfig",
        dict(target_modules=ATTN, r=2, config_A_B="vector", config_C="vector", config_D_E="vector", init_weights=False),
    ),
    Case(
        "glora-none",
        "GloraConfig",
        dict(target_modules=ATTN, config_A_B="constant", config_C="none", config_D_E="none"),
    ),
    Case("hira", "HiraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("hira-gpt2", "HiraConfig", dict(target_modules=["c_attn"], r=2), "gpt2"),
    Case("hira-conv", "HiraConfig", dict(target_modules=CONV, r=2), "conv"),
    Case("hira-embedding", "HiraConfig", dict(target_modules=["embed_tokens"], r=2), invertible=False),
    Case("deft", "DeftConfig", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    Case("deft-qr", "DeftConfig", dict(target_modules=ATTN, r=4, decomposition_method="qr"), invertible=False),
    Case("deft-para-gpt2", "DeftConfig", dict(target_modules=["c_attn"], r=3, para=True), "gpt2"),
    Case("osf", "OSFConfig", dict(target_modules=ATTN, effective_rank=4), invertible=False),
    Case("supertuning", "SupertuningConfig", dict(target_modules=ATTN, sparsity=0.9, init_weights=False)),
    Case("supertuning-lora", "SupertuningConfig", dict(target_modules=ATTN, r=2, lora_alpha=4, sparsity=0.95)),
    Case("pvera", "PveraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("pvera-gpt2", "PveraConfig", dict(target_modules=["c_attn"], r=4), "gpt2"),
    Case("unilora", "UniLoraConfig", dict(target_modules=ATTN, r=4, theta_d_length=64, save_indices=True)),
    Case("frod", "FrodConfig", dict(target_modules=ATTN, init_weights=False, progressbar=False), invertible=False),
    Case(
        "frod-gpt2", "FrodConfig", dict(target_modules=["c_attn", "c_fc"], progressbar=False), "gpt2", invertible=False
    ),
    Case("peanut", "PeanutConfig", dict(target_modules=ATTN, r=4, init_weights=False), invertible=False),
    Case(
        "peanut-deep",
        "PeanutConfig",
        dict(target_modules=ATTN, r=4, depth=2, act_fn="gelu", scaling=0.5),
        invertible=False,
    ),
    Case("tinylora", "TinyLoraConfig", dict(target_modules=ATTN, r=2, u=8, weight_tying=1.0, init_weights=False)),
    Case("tinylora-gpt2", "TinyLoraConfig", dict(target_modules=["c_attn"], r=2, u=4, weight_tying=1.0), "gpt2"),
    Case(
        "trainable-tokens",
        "TrainableTokensConfig",
        dict(token_indices=[1, 5, 7], init_weights=False),
        invertible=False,
    ),
]


# One or two cases per tuner family (additive, product, bias and weight, conv, Conv1D, replacements, selection):
# the rest run with the slow tests.
QUICK = {
    "ia3", "ia3-conv", "adalora-budget", "lokr", "vera-gpt2", "oft", "boft", "hra-conv", "road", "glora",
    "fourierft", "ln-tuning", "trainable-tokens", "replacements", "selection-layers",
}  # fmt: skip
CASES = [dataclasses.replace(c, slow=c.id not in QUICK) for c in _CASES]
CASE = {c.id: c for c in CASES}


def params(cases: list[Case]) -> list[Any]:
    """pytest parameters of `cases`, the slow ones marked so."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in cases]


def _noise(model: torch.nn.Module) -> None:
    """Push every trainable adapter parameter off its initial value, so that no adapter is the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and param.dtype.is_floating_point:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.add_(noise * (param.abs().mean() + 0.1) if "boft_R" not in name else noise)


@dataclasses.dataclass
class Built:
    """A case on disk and PEFT's results for it: `base` is the checkpoint (a Hugging Face directory, or a
    .safetensors file for the conv net, which has no config)."""

    base: Path
    adapter: Path
    oracle: dict[str, torch.Tensor]  # the state dict of PEFT's merge_and_unload()
    unmerged: dict[str, torch.Tensor]  # the base's state dict
    forward: torch.Tensor  # PEFT's unmerged forward on `inputs(arch)`


def inputs(arch: str) -> dict[str, torch.Tensor]:
    if arch == "conv":
        return {"x": torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))}
    return {"input_ids": torch.arange(16).reshape(2, 8) * 7 % 128}


def run(model: torch.nn.Module, arch: str) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs(arch))
    return out if isinstance(out, torch.Tensor) else out.logits


def load(arch: str, checkpoint: Path) -> torch.nn.Module:
    """A model of `arch` with the tensors of `checkpoint` (the merged output, say)."""
    from builders import model_class, read_tensors

    if arch == "conv":
        model = make_model(arch)
        model.load_state_dict(read_tensors(checkpoint))
        return model
    loaded: torch.nn.Module = model_class(arch).from_pretrained(checkpoint, dtype=torch.float32)
    return loaded


class _BlockDiagonal:
    """A CPU stand-in for BOFT's CUDA extension `fbd_cuda`: (N, D, H, H) blocks -> (N, D·H, D·H)."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def build(case: Case, root: Path, dtype: torch.dtype = torch.float32) -> Built:
    """`case` built under `root`: the base (in `dtype`) and the adapter, with PEFT's merge of it in fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not case.butterfly:
            return _build(case, root, dtype)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: _BlockDiagonal)
            return _build(case, root, dtype)


def _build(case: Case, root: Path, dtype: torch.dtype) -> Built:
    import peft
    from safetensors.torch import save_file

    model = make_model(case.arch, dtype)
    if case.arch == "conv":
        base = root / "base.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base)
    else:
        base = root / "base"
        model.save_pretrained(base)
    model = model.float()  # PEFT trains and merges in fp32 on the (rounded) base values
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = peft.get_peft_model(model, getattr(peft, case.config)(**case.kwargs))
    _noise(peft_model)
    if case.prepare:
        case.prepare(peft_model)
    peft_model.save_pretrained(root / "adapter")
    if case.edit:
        config_file = root / "adapter" / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **case.edit}))
    fresh = make_model(case.arch)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, root / "adapter")
    forward = run(loaded, case.arch)
    oracle = {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    return Built(base, root / "adapter", oracle, base_state, forward)
