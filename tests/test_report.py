"""`lorasurgeon report`: counts against independent sums, golden JSON, header-only proof, --fail-on, schema."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from builders import read_tensors, save_adapter, save_model
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon import linalg
from lorasurgeon.checkpoint import Checkpoint
from lorasurgeon.cli import main
from lorasurgeon.documents import report_doc
from lorasurgeon.header import build_header
from lorasurgeon.report_views import report_markdown

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
SCHEMA = json.loads(resources.files("lorasurgeon").joinpath("report.schema.json").read_text())
SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int64: 8}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(["report", *args])
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


# --- counts equal the true sums ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama in bf16, saved in several shards with an index."""
    return save_model(tmp_path_factory.mktemp("sharded") / "base", dtype=torch.bfloat16, max_shard_size="20KB")


def test_checkpoint_counts_equal_true_sums(sharded: Path) -> None:
    truth = read_tensors(sharded)
    report = lorasurgeon.report(sharded)
    assert len(report.shards) > 2  # it really is sharded
    assert (report.kind, report.format) == ("checkpoint", "dir")
    assert report.totals.tensors == len(truth)
    assert report.totals.parameters == numel(truth)
    assert report.totals.bytes == sum(t.numel() * SIZES[t.dtype] for t in truth.values())
    assert {c.name: c.parameters for c in report.by_dtype} == {"BF16": numel(truth)}
    assert sum(c.parameters for c in report.shards) == numel(truth)
    assert sum(c.parameters * c.repeat for c in report.groups) == numel(truth)
    (layers,) = [g for g in report.groups if g.name == "model.layers.*"]
    layer0 = {k: v for k, v in truth.items() if k.startswith("model.layers.0.")}
    assert (layers.repeat, layers.indices, layers.tensors) == (2, "0-1", len(layer0))
    assert layers.parameters == numel(layer0)
    norms = {k: v for k, v in truth.items() if "norm" in k}
    assert {c.name: c.parameters for c in report.categories}["norm"] == numel(norms) == 32 * 5
    for shard in report.shards:
        assert shard.bytes == (sharded / shard.name).stat().st_size
        assert shard.metadata == {"format": "pt"}


def test_adapter_counts_and_reduction(llama_dir: Path, llama_adapter: Path) -> None:
    truth = read_tensors(llama_adapter / "adapter_model.safetensors")
    report = lorasurgeon.report(llama_adapter, base=llama_dir)
    assert (report.kind, report.format) == ("adapter", "peft")
    assert report.totals.parameters == numel(truth) == report.lora_parameters[0]
    assert report.targets == {
        name: 2 for name in ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    }
    (q,) = [m for m in report.modules if m.module == "model.layers.0.self_attn.q_proj"]
    # hidden 32, r=4, alpha=8: A (4, 32) + B (32, 4) = 256 parameters adapting 32×32 = 1024: 75 % fewer
    assert (q.kind, q.rank, q.alpha, q.scale, q.base_shape) == ("linear", 4, 8.0, 2.0, (32, 32))
    assert (q.parameters, q.base_parameters, q.reduction) == (256, 1024, 0.75)
    base = read_tensors(llama_dir)
    projections = {k: v for k, v in base.items() if k.endswith("_proj.weight")}
    assert report.lora_parameters[1] == numel(projections)
    assert report.check is not None and report.check.findings == ()
    assert report.check.touched_parameters == numel(projections)
    assert report.check.base_parameters == numel(base)


def test_dora_and_modules_to_save_are_described(tmp_path: Path, llama_dir: Path) -> None:
    """DoRA + modules_to_save: magnitudes and the replaced head are counted, and --base measures the touch."""
    path = save_adapter(llama_dir, tmp_path / "dora", r=4, lora_alpha=16, use_dora=True, modules_to_save=["lm_head"])
    truth = read_tensors(path / "adapter_model.safetensors")
    report = lorasurgeon.report(path, base=llama_dir)
    assert report.totals.parameters == numel(truth)
    (head,) = [m for m in report.modules if m.module == "lm_head"]
    assert (head.kind, head.parameters, head.base_shape) == ("replacement", 128 * 32, None)
    (q,) = [m for m in report.modules if m.module == "model.layers.1.self_attn.q_proj"]
    assert set(q.tensors) == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert (q.parameters, q.scale) == (4 * 32 + 32 * 4 + 32, 4.0)  # DoRA adds `out` magnitudes
    assert report.check is not None and report.check.touched_parameters > 128 * 32


def test_a_refused_adapter_is_described_and_check_says_why(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(llama_adapter, tmp_path / "replicated")
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    (tmp_path / "replicated/adapter_config.json").write_text(json.dumps(config | {"layer_replication": [[0, 2]]}))
    report = lorasurgeon.report(tmp_path / "replicated", base=llama_dir)
    assert report.totals.parameters == numel(read_tensors(llama_adapter / "adapter_model.safetensors"))
    assert len(report.modules) == 14
    assert report.check is not None
    assert [f.severity for f in report.check.findings] == ["error"]
    assert "layer_replication" in report.check.findings[0].message
    code, _, err = run(capsys, str(tmp_path / "replicated"), "--base", str(llama_dir), "--fail-on", "mismatch")
    assert code == 1 and "fail-on mismatch: 1 findings" in err


def test_kohya_file_is_described_with_its_alphas(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 40),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(24, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 16, 3, 3),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(16, 8, 1, 1),
    }
    save_file(tensors, tmp_path / "style.safetensors")
    report = lorasurgeon.report(tmp_path / "style.safetensors")
    assert (report.kind, report.format) == ("adapter", "kohya")
    assert report.totals.parameters == 4 * 40 + 24 * 4 + 8 * 16 * 9 + 16 * 8  # the .alpha scalar is no parameter
    linear, conv = sorted(report.modules, key=lambda m: m.kind, reverse=True)
    assert (linear.kind, linear.rank, linear.alpha, linear.scale, linear.base_shape) == (
        "linear",
        4,
        2.0,
        0.5,
        (24, 40),
    )
    assert (conv.kind, conv.alpha, conv.scale, conv.base_shape) == ("conv", 8.0, 1.0, (16, 16, 3, 3))  # no alpha: = r


def test_adapter_file_without_config_has_unknown_scale(
    tmp_path: Path, llama_dir: Path, llama_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(llama_adapter / "adapter_model.safetensors", tmp_path / "loose.safetensors")
    report = lorasurgeon.report(tmp_path / "loose.safetensors", base=llama_dir)
    assert (report.kind, report.config) == ("adapter", {"has_config": False})
    assert {(m.rank, m.alpha, m.scale) for m in report.modules} == {(4, None, None)}
    assert [f.severity for f in report.findings] == ["warning"] and "scale is unknown" in report.findings[0].message
    assert report.check is not None and "alpha=…" in report.check.findings[0].message
    code, _, err = run(capsys, str(llama_dir), "--base", str(llama_dir))
    assert code == 2 and "--base is only for adapters" in err


@pytest.mark.parametrize(
    ("field", "value"), [("r", 0), ("r", "8"), ("lora_alpha", None), ("use_rslora", 1), ("rank_pattern", {"q": "x"})]
)
def test_bad_config_field_is_an_input_error(
    field: str, value: Any, tmp_path: Path, llama_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(llama_adapter, tmp_path / "bad")
    config = json.loads((llama_adapter / "adapter_config.json").read_text()) | {field: value}
    (tmp_path / "bad/adapter_config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, str(tmp_path / "bad"), "--json")
    assert (code, out) == (2, "")
    assert "adapter_config.json: field" in err and field.split("_")[0] in err


def test_gpt2_categories_equal_true_sums(tmp_path: Path) -> None:
    truth = read_tensors(save_model(tmp_path / "gpt2", arch="gpt2"))
    categories = {c.name: c.parameters for c in lorasurgeon.report(tmp_path / "gpt2").categories}
    norms = {k: v for k, v in truth.items() if ".ln_" in k or k.startswith("ln_f") or ".ln_f." in k}
    embeddings = {k: v for k, v in truth.items() if "wte" in k or "wpe" in k or "lm_head" in k}
    biases = {k: v for k, v in truth.items() if k.endswith(".bias") and k not in norms}
    assert len(norms) == 2 * 2 * 2 + 2 and len(biases) == 2 * 4 and embeddings
    assert categories["norm"] == numel(norms)
    assert categories["embedding"] == numel(embeddings)
    assert categories["bias"] == numel(biases)
    assert sum(categories.values()) == numel(truth)


def test_rslora_and_patterns_give_the_effective_scale() -> None:
    """samples/adapter-rslora: r=8, alpha 16, use_rslora, rank_pattern {mlp.down_proj: 4}, alpha_pattern
    {self_attn.o_proj: 32}; the scale is alpha / sqrt(r) with each module's own r and alpha."""
    modules = {m.module.split(".", 3)[3]: m for m in lorasurgeon.report(REPO / "samples/adapter-rslora").modules}
    assert (modules["mlp.down_proj"].rank, modules["mlp.down_proj"].scale) == (4, 16 / 2)
    assert (modules["self_attn.o_proj"].alpha, modules["self_attn.o_proj"].scale) == (32, 32 / math.sqrt(8))
    assert (modules["self_attn.q_proj"].alpha, modules["self_attn.q_proj"].scale) == (16, 16 / math.sqrt(8))


def test_blocks_that_differ_are_not_collapsed_together(tmp_path: Path) -> None:
    tensors = {f"h.{i}.w": torch.zeros(4, 4) for i in range(3)} | {
        "h.3.w": torch.zeros(4, 8),
        "h.5.w": torch.zeros(4, 4),
    }
    save_file(tensors | {"wte.weight": torch.zeros(10, 4)}, tmp_path / "m.safetensors")
    groups = [
        (g.name, g.repeat, g.indices, g.parameters) for g in lorasurgeon.report(tmp_path / "m.safetensors").groups
    ]
    assert groups == [("h.*", 4, "0-2,5", 16), ("h.*", 1, "3", 32), ("wte", 1, "", 40)]


# --- golden JSON of the samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("sample", ["base", "adapter-lora"])
def test_samples_match_golden(sample: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    doc = report_doc(lorasurgeon.report(f"samples/{sample}"))
    golden = json.loads((GOLDEN / f"report-{sample}.json").read_text())
    assert doc == golden
    # the golden numbers, checked against sums computed here from the tensors themselves
    files = sorted((REPO / "samples" / sample).glob("*.safetensors"))
    truth = {k: v for f in files for k, v in read_tensors(f).items()}
    assert golden["totals"]["parameters"] == numel(truth)
    assert golden["totals"]["bytes"] == sum(t.numel() * SIZES[t.dtype] for t in truth.values())
    assert golden["shards"][0]["file_bytes"] == files[0].stat().st_size


def test_golden_sample_numbers_by_hand() -> None:
    """Llama hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256; LoRA r=8, alpha 16."""
    base = json.loads((GOLDEN / "report-base.json").read_text())
    block = 64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3 + 64 * 2  # q, o; k, v; gate, up, down; two norms
    assert block == 36992
    assert base["totals"]["parameters"] == 2 * 256 * 64 + 2 * block + 64 == 106816
    assert base["totals"]["bytes"] == 2 * 106816  # bf16
    adapter = json.loads((GOLDEN / "report-adapter-lora.json").read_text())["adapter"]
    per_layer = 8 * (64 + 64) * 2 + 8 * (64 + 32) * 2 + 8 * (64 + 128) * 3  # r·(in + out) per projection
    assert adapter["lora_parameters"] == 2 * per_layer == 16384
    assert adapter["per_layer"] == {"0": per_layer, "1": per_layer}
    assert adapter["base_parameters"] == 2 * (block - 128) == 73728
    assert adapter["reduction"] == pytest.approx(1 - 16384 / 73728)
    assert {m["scale"] for m in adapter["modules"]} == {16 / 8}


# --- header-only: no tensor data is read ------------------------------------------------------------------


def sparse_checkpoint(path: Path, layers: int = 4, dim: int = 1024) -> Path:
    """A checkpoint whose tensor data is one sparse hole (dim² fp32 per matrix): headers only on disk."""
    entries = [(f"model.layers.{i}.{name}.weight", "F32", (dim, dim)) for i in range(layers) for name in ("q", "v")]
    header = build_header(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(4 * math.prod(shape) for _, _, shape in entries))
    return path


def bytes_read() -> int:
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text())[1])  # type: ignore[index]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_header_only_reads_no_tensor_data(tmp_path: Path) -> None:
    path = sparse_checkpoint(tmp_path / "big.safetensors")
    data = path.stat().st_size
    before = bytes_read()
    report = lorasurgeon.report(path)
    header_only = bytes_read() - before
    assert report.totals.bytes == 8 * 4 * 1024 * 1024
    assert header_only < 64 * 1024  # the header and nothing more
    before = bytes_read()
    lorasurgeon.report(path, stats=True)  # the guard: the same measure sees a data pass
    assert bytes_read() - before >= data - 4096


def test_header_only_never_touches_the_data_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sparse_checkpoint(tmp_path / "big.safetensors", layers=2, dim=64)
    with path.open("rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    calls: list[str] = []

    def refuse(*args: Any) -> Any:
        calls.append("read")
        raise OSError("tensor data must not be read")

    def header_only(fd: int, length: int, offset: int) -> bytes:
        """The header reader's preads, refused past the header: where the tensor data starts."""
        return real_pread(fd, length, offset) if offset + length <= data_start else refuse()

    def header_only_v(fd: int, buffers: list[memoryview], offset: int) -> int:
        length = sum(len(b) for b in buffers)
        return real_preadv(fd, buffers, offset) if offset + length <= data_start else refuse()

    real_pread, real_preadv = os.pread, os.preadv
    monkeypatch.setattr(os, "pread", header_only)
    monkeypatch.setattr(os, "preadv", header_only_v)
    monkeypatch.setattr(Checkpoint, "read", refuse)
    assert lorasurgeon.report(path).totals.tensors == 4
    assert calls == []
    with pytest.raises(OSError, match="must not be read"):
        lorasurgeon.report(path, stats=True)
    assert calls


# --- --stats ----------------------------------------------------------------------------------------------


def test_stats_equal_torch_on_the_tensors(tmp_path: Path) -> None:
    values = torch.tensor([1.0, float("nan"), -3.0, float("inf"), 5.0, float("-inf"), 0.5])
    huge = torch.tensor([3e38, -3e38])  # squares overflow fp32: the statistics must stay finite (JSON has no inf)
    save_file({"w": values, "ids": torch.arange(6), "huge": huge}, tmp_path / "t.safetensors")
    report = lorasurgeon.report(tmp_path / "t.safetensors", stats=True)
    stats = {s.name: s for s in report.stats or ()}
    finite = torch.tensor([1.0, -3.0, 5.0, 0.5], dtype=torch.float64)
    w = stats["w"]
    assert (w.nan, w.inf, w.min, w.max) == (1, 2, -3.0, 5.0)
    assert w.mean == pytest.approx(finite.mean().item()) and w.std == pytest.approx(finite.std().item())
    assert (stats["ids"].min, stats["ids"].max, stats["ids"].mean) == (0, 5, 2.5)
    assert stats["huge"].std == pytest.approx(math.sqrt(2) * 3e38, rel=1e-6)


def test_stats_stream_one_tensor_at_a_time_with_progress(tmp_path: Path) -> None:
    seen: list[lorasurgeon.Progress] = []
    report = lorasurgeon.report(REPO / "samples/base", stats=True, on_progress=seen.append)
    assert [p.tensors_done for p in seen] == list(range(1, report.totals.tensors + 1))
    assert seen[-1].bytes_done == seen[-1].bytes_total == report.totals.bytes


def test_delta_norms_equal_dense_svd(llama_adapter: Path) -> None:
    report = lorasurgeon.report(llama_adapter, stats=True)
    tensors = read_tensors(llama_adapter / "adapter_model.safetensors")
    for m in report.modules:
        dense = m.scale * tensors[m.tensors["lora_B"]].double() @ tensors[m.tensors["lora_A"]].double()
        sigma = torch.linalg.svdvals(dense)
        assert m.delta_norm == pytest.approx(torch.linalg.norm(dense).item(), rel=1e-9)
        assert m.delta_spectral_norm == pytest.approx(sigma[0].item(), rel=1e-9)
        assert m.stable_rank == pytest.approx((sigma**2).sum().item() / sigma[0].item() ** 2, rel=1e-9)
        assert 1 <= m.stable_rank <= 4  # r = 4, and B != 0


def test_nonfinite_adapter_gives_valid_json_and_fires(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(REPO / "samples/adapter-lora", tmp_path / "bad")
    weights = tmp_path / "bad/adapter_model.safetensors"
    tensors = read_tensors(weights)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 2] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    code, out, _ = run(capsys, str(tmp_path / "bad"), "--json", "--fail-on", "nan", "--fail-on", "inf")
    doc = json.loads(out)  # strict JSON: a NaN norm would have been written as a bare NaN
    jsonschema.validate(doc, SCHEMA)
    assert code == 1 and [h["rule"] for h in doc["fired"]] == ["nan"]
    (v,) = [m for m in doc["adapter"]["modules"] if m["module"] == "model.layers.1.self_attn.v_proj"]
    assert v["delta_norm"] is None and v["stable_rank"] is None
    assert all(m["stable_rank"] for m in doc["adapter"]["modules"] if m is not v)


@pytest.mark.parametrize("alpha", [torch.tensor(float("inf")), torch.tensor([1.0, 2.0]), torch.tensor(True)])
def test_bad_kohya_alpha_is_an_input_error(alpha: torch.Tensor, tmp_path: Path) -> None:
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(3, 2)}
    save_file(tensors | {"lora_unet_x.alpha": alpha}, tmp_path / "k.safetensors")
    with pytest.raises(lorasurgeon.LorasurgeonError, match=r"lora_unet_x\.alpha must hold one finite number"):
        lorasurgeon.report(tmp_path / "k.safetensors")


def test_lora_delta_norms_of_a_known_matrix() -> None:
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (2, 3)
    b = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # (2, 2): BA has singular values 4 and 3
    assert linalg.lora_delta_norms(a, b) == pytest.approx((5.0, 4.0, 25 / 16))


# --- --fail-on --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nonfinite") / "bad.safetensors"
    save_file({"a": torch.tensor([1.0, float("nan"), float("nan")]), "b": torch.tensor([float("inf"), 0.0])}, path)
    return path


SAMPLES_BASE, SAMPLES_LORA = str(REPO / "samples/base"), str(REPO / "samples/adapter-lora")
RULES = [
    # rule, crafted input that fires it, clean input that must not
    ("nan", ["NONFINITE"], [SAMPLES_BASE]),
    ("inf", ["NONFINITE"], [SAMPLES_BASE]),
    ("mismatch", ["LLAMA_ADAPTER", "--base", SAMPLES_BASE], [SAMPLES_LORA, "--base", SAMPLES_BASE]),
    ("rank>4", [SAMPLES_LORA], ["LLAMA_ADAPTER"]),
    ("params>100K", [SAMPLES_BASE], [SAMPLES_LORA]),
    ("params>0.1m", [SAMPLES_BASE], ["NONFINITE"]),
    ("dtype!=bf16", [SAMPLES_LORA], [SAMPLES_BASE]),
    ("dtype==BF16", [SAMPLES_BASE], [SAMPLES_LORA]),
]


@pytest.mark.parametrize(("rule", "fires", "quiet"), RULES)
def test_each_rule_fires_on_crafted_input_and_not_on_clean(
    rule: str,
    fires: list[str],
    quiet: list[str],
    nonfinite: Path,
    llama_adapter: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    names = {"NONFINITE": str(nonfinite), "LLAMA_ADAPTER": str(llama_adapter)}
    code, out, err = run(capsys, *[names.get(a, a) for a in fires], "--fail-on", rule, "--json")
    assert code == 1
    assert f"fail-on {rule}:" in err
    assert [hit["rule"] for hit in json.loads(out)["fired"]] == [rule]
    code, out, err = run(capsys, *[names.get(a, a) for a in quiet], "--fail-on", rule, "--json")
    assert (code, json.loads(out)["fired"], "fail-on" in err) == (0, [], False)


def test_fired_rules_name_their_reason(nonfinite: Path) -> None:
    hits = lorasurgeon.report(nonfinite, fail_on=["nan", "inf", "params>4"]).fired
    assert [(h.rule, h.reason) for h in hits] == [
        ("nan", "2 NaN values in 1 tensors (first: a)"),
        ("inf", "1 ±Inf values in 1 tensors (first: b)"),
        ("params>4", "5 parameters > 4"),
    ]


@pytest.mark.parametrize("rule", ["nans", "rank>", "rank<4", "dtype!=int3", "params>5X", ""])
def test_unknown_rule_is_a_usage_error(rule: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, SAMPLES_BASE, "--fail-on", rule)
    assert (code, out) == (2, "")
    assert err.startswith("Error: --fail-on") and "Traceback" not in err


def test_unreadable_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    code, out, err = run(capsys, str(tmp_path / "junk.safetensors"), "--json")
    assert (code, out) == (2, "")
    assert "junk.safetensors" in err and "Traceback" not in err


def test_json_and_markdown_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, SAMPLES_BASE, "--json", "--markdown")[0] == 2


# --- output: JSON schema, Markdown, rich ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [SAMPLES_BASE],
        [SAMPLES_BASE, "--stats"],
        ["NONFINITE", "--fail-on", "nan"],
        [SAMPLES_LORA, "--base", SAMPLES_BASE, "--stats"],
    ],
)
def test_json_validates_against_the_shipped_schema(
    args: list[str], nonfinite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    _, out, _ = run(capsys, *[str(nonfinite) if a == "NONFINITE" else a for a in args], "--json")
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema can fail
        jsonschema.validate({**doc, "totals": {"tensors": "many"}}, SCHEMA)


def schema_fields(schema: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for node in (schema, *schema.get("$defs", {}).values()):
        stack = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                out |= set(item.get("properties", {}))
                stack += list(item.values())
            elif isinstance(item, list):
                stack += item
    return out


def test_every_schema_field_is_documented() -> None:
    doc = (REPO / "README.md").read_text()
    missing = sorted(f for f in schema_fields(SCHEMA) if f"`{f}`" not in doc)
    assert len(schema_fields(SCHEMA)) > 40
    assert missing == []


def test_markdown_and_rich_show_the_same_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    markdown = report_markdown(lorasurgeon.report(SAMPLES_LORA))
    assert "| q_proj | 2 | linear | 8 | 16 | 2 | 64×64 | 2,048 | 8,192 | 75.00% |" in markdown
    code, out, err = run(capsys, SAMPLES_LORA, "--markdown", "--fail-on", "rank>4")
    assert code == 1 and "**failed: rank>4**" in out and "fail-on rank>4:" in err
    code, out, err = run(capsys, SAMPLES_BASE)
    assert (code, out) == (0, "")
    assert "model.layers.* ×2 [0-1]" in err and "106,816" in err


def test_format_is_detected_by_the_rules_merge_uses(tmp_path: Path) -> None:
    """Bare `transformer.` keys without diffusers metadata are a PEFT export (as load_adapter reads them), not a
    diffusers file; with `lora_adapter_metadata` they are diffusers."""
    factors = {
        "transformer.h.0.attn.c_attn.lora_A.weight": torch.ones(2, 8),
        "transformer.h.0.attn.c_attn.lora_B.weight": torch.ones(24, 2),
    }
    save_file(factors, tmp_path / "bare.safetensors", metadata={"format": "pt"})
    save_file(factors, tmp_path / "pipe.safetensors", metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    assert lorasurgeon.report(tmp_path / "bare.safetensors").format == "peft"
    assert lorasurgeon.report(tmp_path / "pipe.safetensors").format == "diffusers"
