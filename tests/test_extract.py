"""`lorasurgeon extract` (issue 3): Eckart–Young optimality, PEFT loads the result, logits, bad inputs.

Tolerances, from the maths: factors of an fp32 ΔW reproduce it to a few fp32 ulps of its largest
entries, so "recovered" means |B·A − ΔW| ≤ 1e-5 · max|ΔW|; the exact method's error equals the optimum
√(Σ_{i>r} σ_i²) up to the rounding of a backward-stable fp32 SVD (n·u·‖ΔW‖ ≤ 1e-5 · ‖ΔW‖ for n ≤ 140, also
allowed as 1e-5 relative); randomized and auto
must stay ≤ 1.01 × the optimum, and full-rank logits match the tuned model's within 1e-4 · max|logits|.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from builders import PROJECTIONS, logits, model_class, peft_merged, read_tensors, tree_hashes
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon import decomposition, linalg
from lorasurgeon.cli import main

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """The real entry point with its error funnel; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_variant(base_dir: Path, out: Path, change: dict[str, torch.Tensor]) -> Path:
    """A copy of the HF directory `base_dir` with some tensors replaced (or added/removed via None)."""
    tensors = read_tensors(base_dir)
    for name, tensor in change.items():
        if tensor is None:
            tensors.pop(name)
        else:
            tensors[name] = tensor
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", out / "config.json")
    return out


def low_rank_deltas(base_dir: Path, rank: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """Every projection of `base_dir` plus an exact rank-`rank` delta."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, weight in read_tensors(base_dir).items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            b = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
            a = torch.randn(rank, weight.shape[1], generator=generator)
            out[name] = weight + b @ a
    return out


def adapter_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """module path -> B @ A · scale from an extracted adapter directory (Linear modules)."""
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            rank = config["rank_pattern"].get(module, config["r"])
            alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
            out[module] = tensors[key.replace("lora_A", "lora_B")] @ a * (alpha / rank)
    return out


def peft_logits(base_dir: Path, adapter: Path) -> tuple[torch.Tensor, list[str]]:
    """Logits of base + adapter loaded by PEFT, and the warnings PEFT gave while loading."""
    from peft import PeftModel

    model = model_class("llama").from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        out = peft_model(input_ids=TOKENS).logits
    return out, [str(w.message) for w in caught]


def key_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """A real (tiny) full fine-tune: a few AdamW steps on every projection of the seeded tiny Llama."""
    torch.manual_seed(11)
    model = model_class("llama").from_pretrained(llama_dir, dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad = name.rsplit(".", 2)[-2] in PROJECTIONS
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(7))
    for _ in range(8):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("finetune") / "tuned"
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_exact_low_rank_delta_is_recovered_and_merges_back(work: Path, llama_dir: Path, method: str) -> None:
    changed = low_rank_deltas(llama_dir, rank=3)
    tuned = save_variant(llama_dir, work / "tuned", changed)
    summary = lorasurgeon.extract(llama_dir, tuned, work / "lora", rank=3, method=method)
    assert len(summary.matrices) == 14 and summary.total_error < 1e-5
    if method == "randomized":  # the 64x32 MLP matrices are sketched with 3 + 16 < 32 columns
        assert {m.method for m in summary.matrices if 64 in m.shape} == {"randomized"}
    base = read_tensors(llama_dir)
    for module, delta in adapter_delta(work / "lora").items():
        expected = changed[f"{module}.weight"] - base[f"{module}.weight"]
        assert (delta - expected).abs().max() <= 1e-5 * expected.abs().max(), module
    lorasurgeon.merge(llama_dir, [work / "lora"], work / "merged")
    merged = read_tensors(work / "merged")
    for name, tensor in changed.items():
        assert not torch.equal(tensor, base[name])  # the fixture did change it
        assert (merged[name] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name


def spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    k = len(sigma)
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q
    return ((u * sigma) @ v.T).float()


@st.composite
def decaying(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A matrix with a power-law spectrum σ_i = i^-p (+ a noise floor), and a rank to cut it at."""
    m, n = draw(st.integers(40, 140)), draw(st.integers(40, 140))
    power, floor = draw(st.sampled_from([0.2, 0.5, 1.0, 2.0])), draw(st.sampled_from([0.0, 0.02]))
    sigma = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -power + floor
    rank = draw(st.integers(1, min(m, n) // 5))
    return spectrum_matrix(m, n, sigma, draw(st.integers(0, 2**20))), sigma, rank


def error_of(delta: torch.Tensor, method: str, rank: int) -> float:
    rule = decomposition.RankRule(rank=rank, method=method)
    u, s, vh, _ = decomposition.svd(delta, rule, rank, torch.Generator().manual_seed(0))
    b, a = linalg.split_factors(u, s, vh, rank, 1.0)
    return float(torch.linalg.matrix_norm((delta - b @ a).double()).item())


@settings(max_examples=40, deadline=None)
@given(decaying())
def test_eckart_young_exact_equals_and_randomized_stays_within_one_percent(
    case: tuple[torch.Tensor, torch.Tensor, int],
) -> None:
    delta, sigma, rank = case
    optimum = float(sigma[rank:].square().sum().sqrt())
    slack = 1e-5 * float(sigma.square().sum().sqrt())
    assert error_of(delta, "exact", rank) == pytest.approx(optimum, rel=1e-5, abs=slack)
    assert error_of(delta, "randomized", rank) <= 1.01 * optimum + slack
    with mock.patch.object(decomposition, "RANDOMIZED_FROM", 0):  # auto's choice at these sizes is randomized
        assert error_of(delta, "auto", rank) <= 1.01 * optimum + slack
    assert error_of(delta, "exact", len(sigma)) <= slack  # full rank reproduces ΔW


@pytest.mark.parametrize(
    ("shape", "rank", "chosen"),
    [
        ((1024, 320), 16, "randomized"),
        ((320, 1024), 16, "randomized"),
        ((200, 300), 8, "randomized"),
        ((200, 300), 32, "exact"),
        ((64, 128), 8, "exact"),
    ],
)
def test_auto_takes_the_cheaper_method_and_keeps_the_guarantee(shape: tuple[int, int], rank: int, chosen: str) -> None:
    """Randomized once the smaller side is RANDOMIZED_FROM × the sketch's columns (bench/svd_crossover.py measured
    it 12-60x faster at 1024 wide, rank 16, where auto used to take the exact SVD); exact below that."""
    sigma = torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -0.5
    delta = spectrum_matrix(*shape, sigma, seed=3)
    rule = decomposition.RankRule(rank=rank)
    assert decomposition.svd(delta, rule, rank, torch.Generator().manual_seed(0))[3] == chosen
    optimum = float(sigma[rank:].square().sum().sqrt())
    assert error_of(delta, "auto", rank) <= 1.01 * optimum


def test_one_power_iteration_without_oversampling_is_not_enough() -> None:
    """Guard for the guard: the naive sketch misses the optimum by > 1 % where ours does not."""
    sigma = torch.arange(1, 301, dtype=torch.float64) ** -0.5
    delta, rank = spectrum_matrix(300, 400, sigma, seed=1), 8
    optimum = float(sigma[rank:].square().sum().sqrt())
    u, s, vh, _ = linalg.randomized_svd(delta, rank, 0, 1, -1.0, torch.Generator().manual_seed(0))
    b, a = linalg.split_factors(u, s, vh, rank, 1.0)
    assert float(torch.linalg.matrix_norm((delta - b @ a).double())) > 1.02 * optimum
    assert error_of(delta, "randomized", rank) <= 1.01 * optimum


@pytest.mark.oracle
def test_real_finetune_peft_loads_without_key_warnings(work: Path, llama_dir: Path, finetuned: Path) -> None:
    summary = lorasurgeon.extract(llama_dir, finetuned, work / "lora", rank=4)
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(PROJECTIONS) and len(summary.matrices) == 14
    ours, messages = peft_logits(llama_dir, work / "lora")
    assert key_warnings(messages) == []
    base, tuned = logits(llama_dir, tokens=TOKENS), logits(finetuned, tokens=TOKENS)
    assert not torch.allclose(base, tuned, atol=1e-3)  # the fine-tune changed the model
    assert (ours - tuned).norm() < 0.9 * (base - tuned).norm()


@pytest.mark.oracle
def test_real_finetune_full_rank_matches_tuned_logits(work: Path, llama_dir: Path, finetuned: Path) -> None:
    summary = lorasurgeon.extract(llama_dir, finetuned, work / "lora", energy=1.0)
    assert all(m.rank == min(m.shape) for m in summary.matrices) and {m.rank for m in summary.matrices} == {16, 32}
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 32 and set(config["rank_pattern"].values()) == {16}
    assert config["alpha_pattern"] == {} and not config["use_rslora"]  # one alpha: 16/32 folded into the factors
    assert set(summary.folded) == {m.module for m in summary.matrices if m.rank == 16} != set()
    ours, messages = peft_logits(llama_dir, work / "lora")
    tuned = logits(finetuned, tokens=TOKENS)
    assert key_warnings(messages) == []
    assert (ours - tuned).abs().max() <= 1e-4 * tuned.abs().max()


@pytest.mark.oracle
@pytest.mark.parametrize("method", ["auto", "randomized"])
def test_real_finetune_deltas_within_one_percent_of_optimum(
    work: Path, llama_dir: Path, finetuned: Path, method: str
) -> None:
    summary = lorasurgeon.extract(llama_dir, finetuned, rank=2, method=method, dry_run=True)
    base, tuned = read_tensors(llama_dir), read_tensors(finetuned)
    for m in summary.matrices:
        sigma = torch.linalg.svdvals((tuned[m.tensor] - base[m.tensor]).double())
        optimum = float(sigma[2:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert 0 < m.error <= 1.01 * optimum + 1e-6, m.tensor


@pytest.mark.oracle
def test_energy_ranks_alpha_and_embeddings_load_in_peft(work: Path, llama_dir: Path) -> None:
    base = read_tensors(llama_dir)
    generator = torch.Generator().manual_seed(9)
    changed = low_rank_deltas(llama_dir, rank=2)
    changed["model.layers.0.self_attn.q_proj.weight"] += 0.05 * torch.randn(32, 32, generator=generator)
    embed = base["model.embed_tokens.weight"]
    changed["model.embed_tokens.weight"] = embed + 0.1 * torch.randn(128, 2, generator=generator) @ torch.randn(
        2, 32, generator=generator
    )
    tuned = save_variant(llama_dir, work / "tuned", changed)
    summary = lorasurgeon.extract(
        llama_dir, tuned, work / "lora", energy=0.999, max_rank=8, alpha=16, include_embeddings=True
    )
    ranks = {m.module: m.rank for m in summary.matrices}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.embed_tokens"] == 2
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert "embed_tokens" in config["target_modules"] and config["lora_alpha"] == 16 and config["r"] == 2
    assert config["rank_pattern"] == {"^model.layers.0.self_attn.q_proj": 8}  # anchored, as convert writes them
    assert config["alpha_pattern"] == {}  # one alpha: each module's 16/rᵢ is folded into its factors
    assert set(summary.folded) == set(ranks)  # no rank is 16
    keys = read_tensors(work / "lora" / "adapter_model.safetensors")
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 128)
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 2)
    _, messages = peft_logits(llama_dir, work / "lora")
    assert key_warnings(messages) == []
    merged = peft_merged(llama_dir, work / "lora")  # PEFT's own reading of the layout, alpha and patterns
    truncated = "model.layers.0.self_attn.q_proj.weight"  # full-rank noise cut at rank 8: not recovered
    for name, tensor in changed.items():
        if name != truncated:
            assert not torch.equal(tensor, base[name])
            assert (merged[name] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name
    residual = (merged[truncated] - changed[truncated]).norm() / (changed[truncated] - base[truncated]).norm()
    assert residual > 0.1  # the noise is far from rank 8: the guard that this matrix was truncated
    assert residual == pytest.approx(next(m.error for m in summary.matrices if m.tensor == truncated), rel=1e-4)


def test_cli_json_curve_dry_run_and_changed_vectors(
    capsys: pytest.CaptureFixture[str], work: Path, llama_dir: Path
) -> None:
    changed = low_rank_deltas(llama_dir, rank=4)
    norm = "model.layers.1.input_layernorm.weight"
    changed[norm] = read_tensors(llama_dir)[norm] + 0.25
    tuned = save_variant(llama_dir, work / "tuned", changed)
    code, out, err = run(capsys, "extract", llama_dir, tuned, "--curve", "1,2,4", "--dry-run", "--json")
    doc = json.loads(out)
    assert code == 0 and not (work / "tuned-lora").exists()
    assert doc["dry_run"] is True and doc["curve_ranks"] == [1, 2, 4] and len(doc["matrices"]) == 14
    curve = doc["total"]["curve"]
    assert curve[0] > curve[1] > curve[2] and curve[2] < 1e-5  # rank 4 holds a rank-4 delta
    assert doc["changed_not_extracted"] == [{"tensor": norm, "shape": [32], "max_abs_change": pytest.approx(0.25)}]
    code, out, err = run(capsys, "extract", llama_dir, tuned, "--rank", "2")
    assert code == 0 and out == "" and "total (14 matrices)" in err and norm in err
    assert (work / "tuned-lora" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("case", "args", "code", "message"),
    [
        ("shape", ["--rank", "2"], 2, "has shape [16, 32] but [32, 32]"),
        ("missing", ["--rank", "2"], 2, "is not in TUNED"),
        ("same", ["--rank", "2"], 2, "nothing to extract"),
        ("identical", ["--rank", "2"], 2, "nothing to extract"),
        ("low", ["--rank", "2", "--target", "*layernorm"], 2, "only 2-D floating-point weights"),
        ("low", ["--rank", "17"], 2, "--rank 17 exceeds min(out, in) = 16"),
        ("low", ["--energy", "0.5", "--rank", "2"], 2, "exactly one of --rank R or --energy F"),
        ("low", ["--rank", "2", "--plot", "x.png"], 2, "matplotlib"),
        ("low", ["--rank", "2", "--target", "nothing.*"], 2, "no tensor is selected by --target nothing.*"),
    ],
    ids=[
        "shape",
        "missing",
        "same-path",
        "identical-copy",
        "non-2d-target",
        "rank-too-large",
        "both",
        "no-mpl",
        "no-target",
    ],
)
def test_bad_inputs_give_one_error_line_and_write_nothing(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    work: Path,
    llama_dir: Path,
    case: str,
    args: list[str],
    code: int,
    message: str,
) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    changes: dict[str, dict[str, torch.Tensor]] = {
        "shape": {name: torch.zeros(16, 32)},
        "missing": {name: None},  # type: ignore[dict-item]
        "identical": {},
        "low": low_rank_deltas(llama_dir, rank=2),
    }
    tuned = llama_dir if case == "same" else save_variant(llama_dir, work / "tuned", changes[case])
    if "--plot" in args:  # the test extras install matplotlib: hide it, as on a machine without the extra
        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
        )
    before = tree_hashes(llama_dir, tuned)
    got, out, err = run(capsys, "extract", llama_dir, tuned, "-o", work / "lora", *args)
    assert got == code and out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and not (work / "lora").exists()
    assert tree_hashes(llama_dir, tuned) == before


def test_skip_mismatched_turns_errors_into_warnings(work: Path, llama_dir: Path) -> None:
    changed = low_rank_deltas(llama_dir, rank=2)
    changed["model.layers.0.self_attn.q_proj.weight"] = None  # type: ignore[assignment]
    tuned = save_variant(llama_dir, work / "tuned", changed)
    summary = lorasurgeon.extract(llama_dir, tuned, work / "lora", rank=2, skip_mismatched=True)
    assert len(summary.matrices) == 13 and "is not in TUNED" in summary.warnings[0].message
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert "q_proj" not in config["target_modules"]  # full paths of the other q_proj, so PEFT targets 13
    assert "model.layers.1.self_attn.q_proj" in config["target_modules"]


def test_target_glob_and_regex(work: Path, llama_dir: Path) -> None:
    tuned = save_variant(llama_dir, work / "tuned", low_rank_deltas(llama_dir, rank=2))
    by_glob = lorasurgeon.extract(llama_dir, tuned, rank=2, targets=["*.self_attn.*"], dry_run=True)
    by_regex = lorasurgeon.extract(llama_dir, tuned, rank=2, targets=[r"re:.*\.(q|v)_proj"], dry_run=True)
    assert len(by_glob.matrices) == 8 and all("self_attn" in m.module for m in by_glob.matrices)
    assert sorted(m.module.rsplit(".", 1)[1] for m in by_regex.matrices) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert len(by_glob.changed_other) == 6  # the MLP changed too, and is reported as not extracted


@pytest.mark.oracle
def test_gpt2_conv1d_layout_merges_like_tuned_in_peft(work: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """transformers Conv1D stores (in, out): the adapter decomposes ΔWᵀ and sets fan_in_fan_out."""
    from builders import save_model

    base_dir = save_model(tmp_path_factory.mktemp("gpt2") / "base", arch="gpt2")
    base = read_tensors(base_dir)
    generator = torch.Generator().manual_seed(4)
    changed = {
        name: w + torch.randn(w.shape[0], 2, generator=generator) @ torch.randn(2, w.shape[1], generator=generator)
        for name, w in base.items()
        if name.endswith(".weight") and ".c_" in name
    }
    tuned = save_variant(base_dir, work / "tuned", changed)
    summary = lorasurgeon.extract(base_dir, tuned, work / "lora", rank=2)
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and len(summary.matrices) == len(changed) == 8
    from peft import PeftModel

    model = model_class("gpt2").from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, work / "lora").merge_and_unload().state_dict()
    assert key_warnings([str(w.message) for w in caught]) == []
    for name, tensor in changed.items():
        assert (merged[name] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name


@pytest.mark.gpu
def test_cuda_matches_cpu(work: Path, llama_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tuned = save_variant(llama_dir, work / "tuned", low_rank_deltas(llama_dir, rank=2))
    cpu = lorasurgeon.extract(llama_dir, tuned, rank=2, device="cpu", dry_run=True)
    cuda = lorasurgeon.extract(llama_dir, tuned, rank=2, device="cuda", dry_run=True)
    assert cuda.device.startswith("cuda") and [m.rank for m in cuda.matrices] == [m.rank for m in cpu.matrices]
    for c, g in zip(cuda.matrices, cpu.matrices, strict=True):
        assert c.error < 1e-5 and abs(c.norm - g.norm) <= 1e-5 * g.norm, c.tensor


def test_plot_draws_a_png(work: Path, llama_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    from lorasurgeon import render

    tuned = save_variant(llama_dir, work / "tuned", low_rank_deltas(llama_dir, rank=2))
    summary = lorasurgeon.extract(llama_dir, tuned, rank=2, dry_run=True)
    render.plot_extract(summary, work / "spectrum.png")
    assert (work / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.oracle
def test_save_changed_vectors_as_modules_to_save(work: Path, llama_dir: Path) -> None:
    base = read_tensors(llama_dir)
    changed = low_rank_deltas(llama_dir, rank=2)
    norm = "model.layers.0.post_attention_layernorm.weight"
    changed[norm] = base[norm] * 1.5
    tuned = save_variant(llama_dir, work / "tuned", changed)
    summary = lorasurgeon.extract(llama_dir, tuned, work / "lora", rank=2, save_changed_vectors=True)
    assert summary.saved_modules == ("model.layers.0.post_attention_layernorm",)
    config = json.loads((work / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.0.post_attention_layernorm"]
    from peft import PeftModel

    model = model_class("llama").from_pretrained(llama_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, work / "lora").merge_and_unload().state_dict()
    assert key_warnings([str(w.message) for w in caught]) == []
    assert not torch.equal(changed[norm], base[norm])
    for name, tensor in changed.items():
        assert (merged[name] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name
