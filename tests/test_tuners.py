"""Non-LoRA PEFT tuners: the reader (formats/peft_tuners.py) and the maths (tuner_merge and below) against PEFT.

The oracle is PEFT itself: each adapter is built with PEFT's own config on a tiny seeded model (a Llama with
biases, a GPT-2 for transformers Conv1D, a small conv net for Conv2d), its parameters pushed off their
initial values with noise so no tuner is the identity, and saved with save_pretrained. The saved files are read
back with lorasurgeon's reader (headers) and Checkpoint (tensors), every merged tensor is computed from the
base's saved tensors, and compared with the state dict of PEFT's merge_and_unload(): fp32 relative error
≤ 1e-5 of the tensor's largest value, every tensor the merge changed really changed, every other one equal.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorasurgeon import tuner_merge
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.formats import peft_tuner_kinds
from lorasurgeon.formats.peft_tuners import read_tuner_adapter
from lorasurgeon.tuner import Layer, TunerAdapter, TunerModule

RTOL = 1e-5  # fp32 maths in another order than PEFT's: a few ulps of the largest value
LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    attention_bias=True,
    mlp_bias=True,
)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
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


def _model(arch: str) -> torch.nn.Module:
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
    return model


@dataclasses.dataclass(frozen=True)
class Case:
    """One adapter to build: a PEFT config class and its arguments on a model `arch`, and the layer kind of
    each adapted module by name suffix (default linear / conv1d for gpt2 / conv for the conv net)."""

    id: str
    config: str
    kwargs: dict[str, Any]
    arch: str = "llama"
    layers: dict[str, Layer] = dataclasses.field(default_factory=dict)
    invertible: bool = True


CONV = ["conv1", "conv2", "conv3"]
CASES = [
    Case("ia3", "IA3Config", dict(target_modules=ATTN, feedforward_modules=["down_proj"], init_ia3_weights=False)),
    Case("ia3-gpt2", "IA3Config", dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]), "gpt2"),
    Case("ia3-conv", "IA3Config", dict(target_modules=CONV, feedforward_modules=["conv2"]), "conv"),
    Case("adalora", "AdaLoraConfig", dict(target_modules=ATTN, init_r=6, target_r=4, total_step=10)),
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
        layers={"embed_tokens": "embedding"},
    ),
    Case("oft-conv", "OFTConfig", dict(target_modules=["conv2", "conv3"], oft_block_size=4), "conv"),
    Case("boft", "BOFTConfig", dict(target_modules=ATTN, boft_block_size=8, init_weights=False)),
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
    Case(
        "hira-embedding", "HiraConfig", dict(target_modules=["embed_tokens"], r=2), layers={"embed_tokens": "embedding"}
    ),
    Case("deft", "DeftConfig", dict(target_modules=ATTN, r=4, alpha=8, init_weights=False)),
    Case("deft-qr", "DeftConfig", dict(target_modules=ATTN, r=4, decomposition_method="qr"), invertible=False),
    Case("deft-para-gpt2", "DeftConfig", dict(target_modules=["c_attn"], r=3, para=True), "gpt2"),
    Case("osf", "OSFConfig", dict(target_modules=ATTN, effective_rank=4), invertible=False),
    Case("supertuning", "SupertuningConfig", dict(target_modules=ATTN, sparsity=0.9, init_weights=False)),
    Case("supertuning-lora", "SupertuningConfig", dict(target_modules=ATTN, r=2, lora_alpha=4, sparsity=0.95)),
    Case("pvera", "PveraConfig", dict(target_modules=ATTN, r=4, init_weights=False)),
    Case("pvera-gpt2", "PveraConfig", dict(target_modules=["c_attn"], r=4), "gpt2"),
    Case("unilora", "UniLoraConfig", dict(target_modules=ATTN, r=4, theta_d_length=64, save_indices=True)),
    Case(
        "trainable-tokens",
        "TrainableTokensConfig",
        dict(token_indices=[1, 5, 7], init_weights=False),
        layers={"embed_tokens": "embedding"},
        invertible=False,
    ),
]


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
    base: Path  # a safetensors file of the base's state dict
    adapter: Path
    oracle: dict[str, torch.Tensor]
    unmerged: dict[str, torch.Tensor]  # PEFT's forward-side view: the base, for the changed-something guard


def _build(case: Case, root: Path) -> Built:
    import peft
    from safetensors.torch import save_file

    model = _model(case.arch)
    base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    base_file = root / "base.safetensors"
    save_file(base_state, base_file)
    peft_model = peft.get_peft_model(model, getattr(peft, case.config)(**case.kwargs))
    _noise(peft_model)
    peft_model.save_pretrained(root / "adapter")
    fresh = _model(case.arch)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, root / "adapter")
    oracle = {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    return Built(base_file, root / "adapter", oracle, base_state)


Builder = Callable[[Case], Built]


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """Each case's base and adapter, built on first use and kept for the session."""
    cache: dict[str, Built] = {}

    def get(case: Case) -> Built:
        if case.id not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[case.id] = _build(case, tmp_path_factory.mktemp(case.id))
        return cache[case.id]

    return get


def read(built: Built) -> tuple[TunerAdapter, Checkpoint]:
    source = Checkpoint.open(built.adapter / "adapter_model.safetensors")
    config = json.loads((built.adapter / "adapter_config.json").read_text())
    adapter = read_tuner_adapter(
        config, source.tensors, config_path=built.adapter / "adapter_config.json", weights=source.path
    )
    return adapter, source


def layer_of(case: Case, module: str) -> Layer:
    for suffix, layer in case.layers.items():
        if module.endswith(suffix):
            return layer
    return {"llama": "linear", "gpt2": "conv1d", "conv": "conv"}[case.arch]  # type: ignore[return-value]


def merged_tensors(case: Case, built: Built, sign: int = 1) -> dict[str, torch.Tensor]:
    """Every tensor the adapter changes, computed by lorasurgeon from the saved base and adapter files."""
    adapter, source = read(built)
    out: dict[str, torch.Tensor] = {}
    with Checkpoint.open(built.base) as base, source:
        for module in adapter.modules:
            names = {p: module.target(p) for p in module.writes if module.target(p) in base.tensors}
            tensors = {p: base.read(base.tensors[n]) for p, n in names.items()}
            factors = {r: source.read(t) for r, t in {**adapter.shared, **module.tensors}.items()}
            step = tuner_merge.merge if sign > 0 else tuner_merge.unmerge
            result = step(module, tensors, factors, layer=layer_of(case, module.module))
            out.update({names[p]: t for p, t in result.items()})
    return out


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-30))


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_equals_peft_merge_and_unload(case: Case, build: Builder) -> None:
    b = build(case)
    ours = merged_tensors(case, b)
    assert ours, "the adapter changed nothing"
    for name, expected in b.oracle.items():
        base = b.unmerged[name]
        if name in ours:
            assert relative_error(ours[name], expected) <= RTOL, (name, relative_error(ours[name], expected))
            assert not torch.equal(expected, base), f"{name}: PEFT's merge did not change it"
        else:
            assert torch.equal(expected, base), f"{name} changed in PEFT's merge but not in ours"


@pytest.mark.oracle
@pytest.mark.parametrize("case", [c for c in CASES if c.invertible], ids=[c.id for c in CASES if c.invertible])
def test_unmerge_inverts_merge(case: Case, build: Builder, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    b = build(case)
    merged = merged_tensors(case, b)
    merged_file = tmp_path / "merged.safetensors"
    save_file({**b.unmerged, **merged}, merged_file)
    restored = merged_tensors(case, dataclasses.replace(b, base=merged_file), sign=-1)
    assert restored.keys() == merged.keys()
    for name, tensor in restored.items():
        # W' = W + ΔW was rounded at the magnitude of W' (a bias at that of the weight, GLoRA's b + W C), so
        # W' − ΔW is exact to that magnitude's rounding.
        module = name.rpartition(".")[0]
        scale = max(float(t.abs().max()) for n, t in merged.items() if n.rpartition(".")[0] == module)
        assert float((tensor - b.unmerged[name]).abs().max()) <= RTOL * scale, name
        assert not torch.equal(merged[name], b.unmerged[name])
