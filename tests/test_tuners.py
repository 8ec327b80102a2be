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
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgeon import rotations, tuner_merge, weight_products
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.errors import InputError, LorasurgeonError, MismatchError, UnsupportedError
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
    prepare: Callable[[Any], None] | None = None  # edits the PEFT model before saving (e.g. AdaLoRA's budget)
    edit: dict[str, Any] = dataclasses.field(default_factory=dict)  # config fields changed after saving
    butterfly: bool = False  # give BOFT its CUDA block-diagonal op (on CPU), without which PEFT uses 1 factor


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


CASES = [
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
        layers={"embed_tokens": "embedding"},
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


class _BlockDiagonal:
    """A CPU stand-in for BOFT's CUDA extension `fbd_cuda`: (N, D, H, H) blocks -> (N, D·H, D·H)."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def _build(case: Case, root: Path) -> Built:
    if not case.butterfly:
        return _build_with_peft(case, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("peft.tuners.boft.layer.get_fbd_cuda", lambda: _BlockDiagonal)
        return _build_with_peft(case, root)


def _build_with_peft(case: Case, root: Path) -> Built:
    import peft
    from safetensors.torch import save_file

    model = _model(case.arch)
    base_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    base_file = root / "base.safetensors"
    save_file(base_state, base_file)
    peft_model = peft.get_peft_model(model, getattr(peft, case.config)(**case.kwargs))
    _noise(peft_model)
    if case.prepare:
        case.prepare(peft_model)
    peft_model.save_pretrained(root / "adapter")
    if case.edit:
        config_file = root / "adapter" / "adapter_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **case.edit}))
    fresh = _model(case.arch)
    fresh.load_state_dict(base_state)
    loaded = peft.PeftModel.from_pretrained(fresh, root / "adapter")
    forward = run(loaded, case.arch)
    oracle = {k: v.detach().clone() for k, v in loaded.merge_and_unload().state_dict().items()}
    return Built(base_file, root / "adapter", oracle, base_state, forward)


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
    with Checkpoint.open(built.base) as base, source:
        # Replacements first, as PEFT loads them over the base before merging (not undone by unmerge).
        out = {f"{r.module}.{r.param}": source.read(r.tensor) for r in adapter.replacements} if sign > 0 else {}
        for module in adapter.modules:
            names = {p: module.target(p) for p in module.writes if module.target(p) in base.tensors}
            tensors = {p: out.get(n, base.read(base.tensors[n])) for p, n in names.items()}
            factors = {r: source.read(t) for r, t in {**adapter.shared, **module.tensors}.items()}
            step = tuner_merge.merge if sign > 0 else tuner_merge.unmerge
            result = step(module, tensors, factors, layer=layer_of(case, module.module))
            out.update({names[p]: t for p, t in result.items()})
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merged_forward_equals_peft_unmerged_forward(case: Case, build: Builder) -> None:
    """The model with lorasurgeon's merged tensors computes what PEFT's unmerged adapter computes: a merge
    that PEFT itself gets wrong (as it does for OFT on k×k convs, refused below) would show here."""
    b = build(case)
    model = _model(case.arch)
    model.load_state_dict({**b.unmerged, **merged_tensors(case, b)})
    ours = run(model, case.arch)
    assert relative_error(ours, b.forward) <= 10 * RTOL  # two layers of fp32 activations
    assert not torch.equal(run(_model(case.arch), case.arch), b.forward)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-30))


@pytest.mark.oracle
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_equals_peft_merge_and_unload(case: Case, build: Builder) -> None:
    b = build(case)
    ours = merged_tensors(case, b)
    changed = [n for n, t in ours.items() if not torch.equal(t, b.unmerged[n])]
    assert changed, "the adapter changed nothing"
    for name, expected in b.oracle.items():
        base = b.unmerged[name]
        if name in ours:
            assert relative_error(ours[name], expected) <= RTOL, (name, relative_error(ours[name], expected))
            # what we change PEFT changes; what we leave (AdaLoRA's rank-0 module, a saved embedding) it leaves
            assert torch.equal(expected, base) == (name not in changed), name
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
    adapter, source = read(b)
    source.close()
    written = {m.target(p) for m in adapter.modules for p in m.writes if m.target(p) in b.unmerged}
    assert restored.keys() == written
    assert any(not torch.equal(merged[n], b.unmerged[n]) for n in restored)
    for name, tensor in restored.items():
        if torch.equal(merged[name], b.unmerged[name]):
            continue  # AdaLoRA's rank-0 module
        # W' = W + ΔW was rounded at the magnitude of W' (a bias at that of the weight, GLoRA's b + W C), so
        # W' − ΔW is exact to that magnitude's rounding.
        module = name.rpartition(".")[0]
        scale = max(float(t.abs().max()) for n, t in merged.items() if n.rpartition(".")[0] == module)
        assert float((tensor - b.unmerged[name]).abs().max()) <= RTOL * scale, name


CASE = {c.id: c for c in CASES}


@pytest.mark.oracle
def test_every_installed_peft_tuner_is_merged_or_refused_by_name() -> None:
    """A PEFT release that adds a tuner fails here until the tuner is read or refused with a reason."""
    from peft.utils.peft_types import PeftType

    from lorasurgeon.formats.peft_tuner_inventory import DESCRIPTIONS, REFUSED, TUNERS

    installed = {t.value for t in PeftType} - {"LORA"}
    assert installed == TUNERS.keys() | REFUSED.keys(), installed ^ (TUNERS.keys() | REFUSED.keys())
    assert not TUNERS.keys() & REFUSED.keys()
    assert all(len(why) > 40 for why in REFUSED.values())
    assert DESCRIPTIONS.keys() == TUNERS.keys()
    # and every merged tuner is checked against PEFT's merge_and_unload above, which PEFT therefore defines
    assert {_peft_type(c) for c in CASE.values()} == TUNERS.keys(), "every merged tuner has an oracle case"


def _peft_type(case: Case) -> str:
    import peft

    return str(getattr(peft, case.config)(**case.kwargs).peft_type.value)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "POLY", "LILY", "PSOFT", "NEW_TUNER"])
def test_unmerged_tuners_are_refused_with_the_reason(peft_type: str, tmp_path: Path) -> None:
    from lorasurgeon.formats.peft_tuner_inventory import refusal

    with pytest.raises(UnsupportedError) as error:
        read_tuner_adapter({"peft_type": peft_type}, {}, config_path=tmp_path / "c.json", weights=tmp_path / "w")
    assert peft_type in str(error.value) and str(refusal(peft_type)) in str(error.value)


def _read_edited(built: Built, **fields: Any) -> TunerAdapter:
    source = Checkpoint.open(built.adapter / "adapter_model.safetensors")
    config = {**json.loads((built.adapter / "adapter_config.json").read_text()), **fields}
    with source:
        return read_tuner_adapter(config, source.tensors, config_path=built.adapter / "c.json", weights=source.path)


@pytest.mark.oracle
@pytest.mark.parametrize(
    ("case_id", "fields", "words"),
    [
        ("vera", {"save_projection": False}, "saved without its projections"),
        ("randlora", {"save_projection": False}, "saved without its random bases"),
        ("pvera", {"sample_at_inference": True}, "samples its update at inference"),
        ("waveft", {"wavelet_family": "db2"}, "inverts db1 (Haar) only"),
        ("oft", {"peft_version": "0.17.1"}, "Cayley-Neumann series of PEFT 0.17.1"),
        ("ia3", {"feedforward_modules": None}, "per-architecture table"),
        ("loha", {"layer_replication": [[0, 2]]}, "replicated layers"),
        ("hra", {"target_modules": "all-linear"}, "expanded list"),
        ("road", {"variant": "road_3"}, "road_1"),
        ("fourierft", {"n_frequency": 49}, "n_frequency 49"),
        ("lokr-decomposed", {"r": 3}, "r = 3"),
    ],
)
def test_configs_the_files_do_not_support_are_refused(
    case_id: str, fields: dict[str, Any], words: str, build: Builder
) -> None:
    with pytest.raises(LorasurgeonError, match=re.escape(words)):
        _read_edited(build(CASE[case_id]), **fields)


@pytest.mark.oracle
def test_oft_without_block_size_is_refused_as_pre_0_14(build: Builder) -> None:
    b = build(CASE["oft"])
    config = json.loads((b.adapter / "adapter_config.json").read_text())
    del config["oft_block_size"]
    with (
        Checkpoint.open(b.adapter / "adapter_model.safetensors") as source,
        pytest.raises(UnsupportedError, match=r"0\.13"),
    ):
        read_tuner_adapter(config, source.tensors, config_path=b.adapter, weights=source.path)


@pytest.mark.oracle
def test_a_key_peft_would_not_load_is_refused_by_name(build: Builder, tmp_path: Path) -> None:
    b = build(CASE["ia3"])
    with Checkpoint.open(b.adapter / "adapter_model.safetensors") as source:
        tensors = dict(source.tensors)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.stray"] = next(iter(tensors.values()))
    tensors["base_model.stray"] = next(iter(tensors.values()))
    config = json.loads((b.adapter / "adapter_config.json").read_text())
    with pytest.raises(InputError, match=r"base_model\.stray"):
        read_tuner_adapter(config, tensors, config_path=tmp_path, weights=tmp_path / "w")
    del tensors["base_model.stray"]
    with pytest.raises(InputError, match=r"q_proj\.stray"):
        read_tuner_adapter(config, tensors, config_path=tmp_path, weights=tmp_path / "w")


@pytest.mark.oracle
def test_selection_leaves_the_unselected_modules_keys_ignored(build: Builder) -> None:
    adapter, source = read(build(CASE["selection-layers"]))
    source.close()
    assert {m.module for m in adapter.modules} == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert len(adapter.ignored) == 4 * 4 and all("layers.0" in k or "layers.1.mlp" in k for k in adapter.ignored)


@pytest.mark.oracle
def test_replacements_are_what_peft_saves_in_full(build: Builder) -> None:
    adapter, source = read(build(CASE["replacements"]))
    source.close()
    replaced = {f"{r.module}.{r.param}" for r in adapter.replacements}
    assert "lm_head.weight" in replaced and "model.layers.0.self_attn.q_proj.bias" in replaced
    assert all(name.endswith(".bias") or name == "lm_head.weight" for name in replaced)


@pytest.mark.oracle
def test_values_read_from_the_config_per_module(build: Builder) -> None:
    """The per-module values of a few tuners, as PEFT derives them (and the butterfly case has 3 factors)."""
    ia3 = {m.module: m for m in read(build(CASE["ia3"]))[0].modules}
    assert ia3["model.layers.0.mlp.down_proj"].params["feedforward"] is True
    assert ia3["model.layers.0.self_attn.q_proj"].writes == ("weight", "bias")
    lokr = {m.module: m for m in read(build(CASE["lokr-decomposed"]))[0].modules}
    assert lokr["model.layers.0.self_attn.q_proj"].params["scale"] == 1.0  # alpha 2 / rank_pattern's 2
    assert lokr["model.layers.0.self_attn.v_proj"].params["scale"] == 2.0  # alpha 2 / r 1
    budget = {m.module: m for m in read(build(CASE["adalora-budget"]))[0].modules}
    q = budget["model.layers.0.self_attn.q_proj"]
    assert q.tensors["lora_E"].shape == (4, 1) and q.params == {"scaling": 4.0, "ranknum": 6.0}
    assert budget["model.layers.1.mlp.down_proj"].tensors["lora_A"].shape == (0, 64)
    boft = read(build(CASE["boft-butterfly"]))[0].modules[0]
    assert boft.params["factors"] == 3 and boft.tensors["boft_R"].shape[0] == 3


def _module(tuner: str, params: dict[str, Any], writes: tuple[str, ...] = ("weight",)) -> TunerModule:
    return TunerModule(tuner, "m", {}, params, writes)


W = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("module", "factors", "words"),
    [
        (_module("IA3", {"feedforward": True}), {"ia3_l": torch.tensor([[1.0, 0.0, 2, 2, 2, 2]])}, "zero entry"),
        (
            _module("BOFT", {"factors": 1, "blocks": 3, "block_size": 2}),
            {"boft_R": torch.zeros(1, 3, 2, 2), "boft_s": torch.tensor([[0.0]] * 8)},
            "boft_s has a zero entry",
        ),
        (
            _module("ROAD", {"variant": "road_2", "group_size": 4}),
            {"road_theta": torch.ones(8), "road_alpha": torch.tensor([0.0] + [1.0] * 7)},
            "scaled to zero",
        ),
        (
            _module("HIRA", {"embedding": False}),
            {"hira_A": torch.ones(1, 6), "hira_B": -torch.ones(8, 1)},
            "zero entry",
        ),
        (_module("DEFT", {"method": "qr", "para": True, "scaling": 1.0}), {"deft_P": torch.randn(8, 2)}, "qr"),
        (_module("LN_TUNING", {}), {"ln_tuning_layers.weight": W}, "does not hold the originals"),
        (_module("TRAINABLE_TOKENS", {"indices": (1,)}), {"trainable_tokens_delta": W[:1]}, "original rows"),
        (
            _module("OSF", {"low_rank": 2}),
            {f"osf_svd_params.{n}": t for n, t in (("U_low", W[:, :2]), ("S_low", W[0, :2]), ("V_low", W[:2]))},
            "bottom singular directions",
        ),
    ],
)
def test_unmerge_is_refused_where_the_files_cannot_give_the_base(
    module: TunerModule, factors: dict[str, torch.Tensor], words: str
) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(words)):
        tuner_merge.unmerge(module, {"weight": W}, factors)


def test_oft_on_a_kxk_conv_is_refused_because_peft_merges_it_unlike_its_forward() -> None:
    module = _module(
        "OFT",
        {
            "block_size": 4,
            "blocks": 9,
            "block_share": False,
            "coft": False,
            "eps": 0.0,
            "neumann_terms": 5,
            "config_r": 0,
            "config_block_size": 4,
        },
    )
    with pytest.raises(MismatchError, match="merge differs from its forward"):
        tuner_merge.merge(
            module, {"weight": torch.randn(8, 4, 3, 3)}, {"oft_R.weight": torch.zeros(9, 6)}, layer="conv"
        )


@pytest.mark.oracle
def test_peft_merges_oft_on_a_3x3_conv_unlike_its_forward() -> None:
    """The fact behind the refusal above: PEFT's forward rotates unfolded 3×3 patches and folds them back
    (summing overlaps), which its merge_and_unload() (W Rᵀ on the flattened kernel) does not reproduce;
    on a 1×1 conv the two agree."""
    import peft

    gaps = {}
    for kernel in (1, 3):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, kernel, padding=kernel // 2))
        x = torch.randn(2, 4, 6, 6)
        config = peft.OFTConfig(target_modules=["0"], oft_block_size=4 if kernel == 1 else 12, init_weights=False)
        wrapped = peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            unmerged = wrapped(x)
            gaps[kernel] = relative_error(wrapped.merge_and_unload()(x), unmerged)
    assert gaps[1] <= RTOL < 0.01 < gaps[3]


def test_check_names_what_does_not_fit() -> None:
    module = _module("IA3", {"feedforward": False}, ("weight", "bias"))
    assert tuner_merge.check(module, {"weight": (8, 6)}, {"ia3_l": (8, 1)}, "linear") is None
    assert "ia3_l [6, 1]" in str(tuner_merge.check(module, {"weight": (8, 6)}, {"ia3_l": (6, 1)}, "linear"))
    assert "does not adapt" in str(tuner_merge.check(_module("SHIRA", {}), {"weight": (8, 6)}, {}, "conv1d"))
    beft = _module("BEFT", {}, ("bias",))
    beft = dataclasses.replace(beft, needs=("bias",))
    assert "which the base lacks" in str(tuner_merge.check(beft, {"weight": (8, 6)}, {"beft_bias": (1, 8)}, "linear"))


def test_additive_tuners_give_their_delta_for_report() -> None:
    module = _module("C3A", {})
    kernel = torch.randn(2, 3, 2)
    delta = tuner_merge.delta(module, (4, 6), {"c3a_kernel": kernel})
    assert tuner_merge.is_additive(module) and delta.shape == (4, 6)
    assert torch.allclose(tuner_merge.merge(module, {"weight": W[:4]}, {"c3a_kernel": kernel})["weight"], W[:4] + delta)
    assert not tuner_merge.is_additive(_module("OFT", {})) and not tuner_merge.is_additive(
        _module("MISS", {"kind": "bat"})
    )
    with pytest.raises(UnsupportedError, match="no ΔW independent"):
        tuner_merge.delta(_module("HRA", {"apply_gs": False}), (8, 6), {"hra_u": torch.ones(6, 1)})


@pytest.mark.oracle
def test_tinylora_with_vectors_shared_by_position_is_refused(build: Builder, tmp_path: Path) -> None:
    b = build(CASE["tinylora"])
    with Checkpoint.open(b.adapter / "adapter_model.safetensors") as source:
        tensors = dict(source.tensors)
    tensors["base_model.tinylora_v.1"] = tensors["base_model.tinylora_v.0"]  # weight_tying < 1: one per group
    config = json.loads((b.adapter / "adapter_config.json").read_text())
    with pytest.raises(UnsupportedError, match=re.escape("named_modules() order")):
        read_tuner_adapter(config, tensors, config_path=tmp_path, weights=tmp_path / "w")


# Properties of the maths, without PEFT.


@settings(max_examples=30, deadline=None)
@given(factors=st.integers(1, 3), half=st.sampled_from([1, 2, 4]), extra=st.integers(0, 2))
def test_butterfly_permutations_are_permutations(factors: int, half: int, extra: int) -> None:
    blocks = 2 ** (factors - 1) * 2**extra
    n = blocks * half * 2
    for i in range(factors):
        perm = rotations.butterfly_permutation(n, blocks // 2**i, half, factors - 1)
        assert sorted(perm.tolist()) == list(range(n))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), variant=st.sampled_from(["road_1", "road_2", "road_4"]))
def test_road_unmerge_inverts_its_merge(seed: int, variant: str) -> None:
    g = torch.Generator().manual_seed(seed)
    out, group = 8, 4
    size = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[variant]
    theta, alpha = torch.randn(size, generator=g), torch.rand(size, generator=g) + 0.5
    first, second = rotations.road_columns(variant, group, theta, alpha)
    w = torch.randn(out, 5, generator=g)
    merged = rotations.road_merge(w, first, second, group)
    assert not torch.allclose(merged, w)
    assert torch.allclose(rotations.road_unmerge(merged, first, second, group), w, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), terms=st.integers(0, 6), coft=st.booleans())
def test_oft_merge_and_unmerge_are_inverse_and_cayley_is_orthogonal(seed: int, terms: int, coft: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(3, 6, generator=g) * 0.3  # 3 blocks of 4
    blocks = rotations.oft_blocks(vec, 4, coft, 0.5, terms)
    if terms == 0:  # the exact Cayley transform is orthogonal; its Neumann truncation only nearly so
        eye = torch.eye(4, dtype=torch.float64).expand_as(blocks)
        assert torch.allclose(blocks @ blocks.transpose(1, 2), eye, atol=1e-12)
    w = torch.randn(5, 12, generator=g)
    for embedding in (False, True):
        merged = rotations.oft_merge(w, blocks, embedding)
        assert torch.allclose(rotations.oft_unmerge(merged, blocks, embedding), w, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_deft_relu_unmerge_inverts_its_merge(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p, r, w = torch.randn(8, 2, generator=g) * 0.3, torch.randn(2, 5, generator=g), torch.randn(8, 5, generator=g)
    q, gram = weight_products.deft_projection(p, "relu")
    merged = weight_products.deft_merge(w, q, gram, r, 0.5)
    assert not torch.allclose(merged, w)
    assert torch.allclose(weight_products.deft_unmerge(merged, q, gram, r, 0.5), w, atol=1e-4)
