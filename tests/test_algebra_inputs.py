"""`resize` and `combine` on every format and input they take: the algebra's properties through the API (hypothesis,
on generated PEFT adapters read back by an independent reader of adapter_config.json), kohya and diffusers files,
inputs of different formats, full tensors, what is refused by name, and bad input (clear errors, nothing written)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors, run_cli, save_adapter, tree_hashes
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.formats import load_adapter

Deltas = dict[str, torch.Tensor]


def write_peft(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, rslora: bool) -> Path:
    """A PEFT adapter directory of `factors` (module -> (B, A)), r the first module's rank, the others as patterns."""
    path.mkdir(parents=True)
    r = next(iter(factors.values()))[1].shape[0]
    pattern = {f"^{m}": a.shape[0] for m, (_, a) in factors.items() if a.shape[0] != r}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "rank_pattern": pattern}
    (path / "adapter_config.json").write_text(json.dumps(config | {"target_modules": sorted(factors)}))
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, path / "adapter_model.safetensors", {"format": "pt"})
    return path


def deltas_of(path: Path) -> Deltas:
    """ΔW per module of a PEFT directory, read here from its config as PEFT defines it (scale α/r or α/√r, with
    anchored or suffix rank/alpha patterns), in fp64."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = read_tensors(path / "adapter_model.safetensors")

    def pattern(kind: str, module: str, default: float) -> float:
        found = [v for k, v in (config.get(kind) or {}).items() if module == k.lstrip("^") or module.endswith(k)]
        return float(found[0]) if found else default

    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            r = pattern("rank_pattern", module, config["r"])
            alpha = pattern("alpha_pattern", module, config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            out[module] = scale * b.double().flatten(1) @ a.double().flatten(1)
    return out


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x))


@st.composite
def adapters(draw: st.DrawFn) -> dict[str, Any]:
    """Factors of one or two modules (2..10 wide, ranks 1..5, patterns), an alpha and rsLoRA or not."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    factors = {}
    for i in range(draw(st.integers(1, 2))):
        m, n, r = draw(st.integers(2, 10)), draw(st.integers(2, 10)), draw(st.integers(1, 5))
        factors[f"layers.{i}.proj"] = (torch.randn(m, r, generator=generator), torch.randn(r, n, generator=generator))
    return {"factors": factors, "alpha": draw(st.sampled_from([1.0, 4.0, 6.5])), "rslora": draw(st.booleans())}


@settings(max_examples=20, deadline=None)
@given(case=adapters(), weight=st.floats(0.25, 4.0), count=st.integers(2, 4), data=st.data())
def test_algebra_properties_through_the_api(
    case: dict[str, Any], weight: float, count: int, data: st.DataObject
) -> None:
    """Resize to the full rank is ΔW; combine of one adapter at weight 1 is it; A at w plus A at −w is zero; the
    federated mean of identical clients is that client (each for cat and svd where both apply)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = write_peft(root / "a", case["factors"], case["alpha"], case["rslora"])
        delta = deltas_of(a)
        full = max(f[1].shape[0] for f in case["factors"].values())

        def close(out: Path, expected: Deltas, scale: float = 1.0) -> None:
            got = deltas_of(out)
            assert set(got) == set(expected)
            for module, want in expected.items():
                assert norm(got[module] - want) <= 1e-5 * scale * norm(delta[module]) + 1e-30, module

        lorasurgeon.resize(a, root / "resized", rank=full)
        close(root / "resized", delta)
        for method, extra in [("cat", {}), ("svd", {"rank": full})]:
            lorasurgeon.combine([a], root / f"one-{method}", method=method, **extra)
            close(root / f"one-{method}", delta)
            lorasurgeon.combine([a, a], root / f"zero-{method}", weights=[weight, -weight], method=method, **extra)
            close(root / f"zero-{method}", {m: torch.zeros_like(d) for m, d in delta.items()}, weight)
        counts = [data.draw(st.integers(1, 500)) for _ in range(count)]
        lorasurgeon.combine([a] * count, root / "mean", weights=counts, mean=True, rank=full)
        close(root / "mean", delta)
        assert norm(next(iter(delta.values()))) > 0  # the fixtures are not zero


@pytest.fixture
def kohya_file(tmp_path: Path, llama_adapter: Path) -> Path:
    out = tmp_path / "k.safetensors"
    lorasurgeon.convert(llama_adapter, out, to="kohya", component="lora_unet")
    return out


def kohya_deltas(path: Path) -> Deltas:
    adapter = load_adapter(path)
    try:
        return {
            m.module: m.scale * adapter.source.read(m.b).double() @ adapter.source.read(m.a).double()
            for m in adapter.modules
        }
    finally:
        adapter.source.close()


def test_resize_a_kohya_file_writes_kohya(kohya_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    summary = lorasurgeon.resize(kohya_file, out, rank=2)
    tensors = read_tensors(out)
    assert summary.target_format == "kohya" and {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {2.0}
    before, after = kohya_deltas(kohya_file), kohya_deltas(out)
    assert set(before) == set(after) and len(after) == 14
    for module, delta in before.items():
        sigma = torch.linalg.svdvals(delta)
        assert norm(after[module] - delta) <= 1.0001 * float(sigma[2:].square().sum().sqrt()) + 1e-6 * norm(delta)
    with pytest.raises(UnsupportedError, match=r"convert .* to peft first"):
        lorasurgeon.resize(kohya_file, tmp_path / "p", rank=2, to="peft")
    assert not (tmp_path / "p").exists()


def test_diffusers_and_inputs_of_two_formats(llama_adapter: Path, tmp_path: Path) -> None:
    """A diffusers file resized stays diffusers, one lora_alpha in its metadata; a PEFT adapter and its diffusers
    copy meet by module path, so the PEFT one at 1 and the copy at −1 sum to zero."""
    copy = tmp_path / "d.safetensors"
    lorasurgeon.convert(llama_adapter, copy, to="diffusers", component="unet")
    out = tmp_path / "small.safetensors"
    summary = lorasurgeon.resize(copy, out, energy=0.9)
    config = summary.config or {}
    assert summary.target_format == "diffusers" and not config.get("unet.alpha_pattern")
    assert config["unet.lora_alpha"] == config["unet.r"] and len({m.row.new_rank for m in summary.modules}) > 1
    before, after = kohya_deltas(copy), kohya_deltas(out)
    for module, delta in before.items():
        assert norm(after[module] - delta) / norm(delta) == pytest.approx(
            next(m.row.error for m in summary.modules if m.row.name == module), abs=1e-6
        )
    zero = lorasurgeon.combine([llama_adapter, copy], tmp_path / "zero", weights=[1.0, -1.0])
    assert zero.target_format == "peft" and all(m.row.old_rank == 8 for m in zero.modules)
    assert all(norm(d) < 1e-9 for d in deltas_of(tmp_path / "zero").values())


@pytest.fixture
def saved(tmp_path: Path, llama_dir: Path) -> list[Path]:
    """Two adapters with a full lm_head (modules_to_save), made to differ."""
    paths = []
    for seed in (5, 6):
        path = save_adapter(llama_dir, tmp_path / f"s{seed}", seed=seed, r=4, lora_alpha=8, modules_to_save=["lm_head"])
        tensors = read_tensors(path / "adapter_model.safetensors")
        key = "base_model.model.lm_head.weight"
        tensors[key] = tensors[key] + seed
        save_file(tensors, path / "adapter_model.safetensors", {"format": "pt"})
        paths.append(path)
    return paths


def test_full_tensors_are_carried_by_resize_and_averaged_by_mean(saved: list[Path], tmp_path: Path) -> None:
    key = "base_model.model.lm_head.weight"
    lorasurgeon.resize(saved[0], tmp_path / "r", rank=2)
    assert torch.equal(
        read_tensors(tmp_path / "r" / "adapter_model.safetensors")[key],
        read_tensors(saved[0] / "adapter_model.safetensors")[key],
    )
    summary = lorasurgeon.combine(saved, tmp_path / "m", weights=[3, 1], mean=True, rank=4)
    ins = [read_tensors(p / "adapter_model.safetensors")[key] for p in saved]
    assert summary.full == (key,)
    assert torch.allclose(
        read_tensors(tmp_path / "m" / "adapter_model.safetensors")[key], 0.75 * ins[0] + 0.25 * ins[1]
    )
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    with pytest.raises(UnsupportedError, match="weights sum to 1"):
        lorasurgeon.combine(saved, tmp_path / "x", weights=[3, 1])
    assert not (tmp_path / "x").exists()


def test_dora_and_lycoris_are_refused_by_name(tmp_path: Path, llama_dir: Path) -> None:
    dora = save_adapter(llama_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True)
    with pytest.raises(UnsupportedError, match=r"lora_magnitude_vector is a DoRA magnitude"):
        lorasurgeon.resize(dora, tmp_path / "o1", rank=2)
    g = torch.Generator().manual_seed(0)
    loha = {
        f"lora_unet_x.hada_w{i}_{s}": torch.randn(*shape, generator=g)
        for i in (1, 2)
        for s, shape in [("a", (6, 2)), ("b", (2, 5))]
    }
    save_file(loha | {"lora_unet_x.alpha": torch.tensor(2.0)}, tmp_path / "loha.safetensors", {"format": "pt"})
    with pytest.raises(UnsupportedError, match=r"lora_unet_x.hada_w1_a is a LyCORIS loha module"):
        lorasurgeon.combine([tmp_path / "loha.safetensors"], tmp_path / "o2.safetensors")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2.safetensors").exists()


def pair(root: Path, rows: tuple[int, int]) -> list[Path]:
    g = torch.Generator().manual_seed(1)
    return [
        write_peft(
            root / f"p{i}",
            {"layers.0.proj": (torch.randn(m, 2, generator=g), torch.randn(2, 4, generator=g))},
            2.0,
            False,
        )
        for i, m in enumerate(rows)
    ]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda ps, out: lorasurgeon.combine(pair(ps, (3, 5)), out), MismatchError, "different bases"),
        (
            lambda ps, out: lorasurgeon.combine(pair(ps, (3, 3)), out, rank=5),
            LorasurgeonError,
            r"above the largest stacked rank .*, 4",
        ),
        (
            lambda ps, out: lorasurgeon.resize(pair(ps, (3, 3))[0], out, rank=3),
            LorasurgeonError,
            r"above the largest stacked rank .*, 2",
        ),
        (
            lambda ps, out: lorasurgeon.combine(pair(ps, (3, 3)), out, weights=[1.0]),
            LorasurgeonError,
            "1 weights for 2 adapters",
        ),
        (lambda ps, out: lorasurgeon.combine([], out), LorasurgeonError, "no adapter to combine"),
        (
            lambda ps, out: lorasurgeon.combine(pair(ps, (3, 3)), out, weights=[1, -1], mean=True),
            LorasurgeonError,
            "sum to 0",
        ),
        (
            lambda ps, out: lorasurgeon.combine(pair(ps, (3, 3)), out, method="ties"),
            LorasurgeonError,
            "--density|density=D needs",
        ),
        (
            lambda ps, out: lorasurgeon.combine(pair(ps, (3, 3)), out, method="cat", rank=2),
            LorasurgeonError,
            "re-compress",
        ),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, call: Any, error: type, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        call(tmp_path / "in", out)
    assert not out.exists()


def test_weights_files_must_match_the_adapters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = pair(tmp_path, (3, 3))
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(*paths)
    (tmp_path / "w.json").write_text(json.dumps({"p0": 3, "p1": 1}))
    good = lorasurgeon.combine(paths, tmp_path / "json", weights_file=tmp_path / "w.json", mean=True)
    assert good.weights == (0.75, 0.25)
    for name, text, match in [
        ("missing.json", json.dumps({"p0": 3}), "has no weight for"),
        ("extra.csv", "p0,3\np1,1\nelsewhere,2\n", "names none of the 2 adapters"),
        ("bad.csv", "p0,3\np1,many\n", "not `path,weight`|must be a finite number"),
    ]:
        (tmp_path / name).write_text(text)
        code, _, err = run_cli(["combine", "p0", "p1", "--weights", name, "-o", "out"], capsys)
        assert code == 2 and re_search(match, err), err
    code, _, err = run_cli(
        ["combine", "p0", "p1", "--weights", "w.json", "--weight", "1", "--weight", "2", "-o", "out"], capsys
    )
    assert code == 2 and "exclude each other" in err
    code, _, err = run_cli(["combine", "-o", "out"], capsys)
    assert code == 2 and "Missing argument" in err
    assert not (tmp_path / "out").exists() and tree_hashes(*paths) == before


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, " ".join(text.split())) is not None


def test_resize_json_document(capsys: pytest.CaptureFixture[str], llama_adapter: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(
        ["resize", str(llama_adapter), "--ratio", "2", "--json", "-o", str(tmp_path / "o")], capsys
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["operation"] == "resize" and doc["to"] == "peft" and len(doc["modules"]) == 14
    row = doc["modules"][0]
    assert row["old_rank"] == 4 and 1 <= row["new_rank"] <= 4 and row["naive_relative_error"] is None
    assert doc["config"]["lora_alpha"] == doc["config"]["r"] and doc["total"]["params"] > 0
