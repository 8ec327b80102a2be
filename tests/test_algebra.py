"""`resize` and `combine` end to end, against oracles: PEFT's own add_weighted_adapter(combination_type="cat"), the
dense fp64 SVD optimum (torch.linalg.svdvals) with each rank rule recomputed here from its definition, an
independent dense TIES, and PEFT loading every output (no key warnings) with the ΔW the table states."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import read_tensors, run_cli, save_adapter
from test_spectrum_rules import by_definition

import lorasurgeon
from lorasurgeon.budget import allocate_budget

pytestmark = pytest.mark.oracle
STORED = 1e-6  # relative: the output's factors are stored in fp32 (one rounding each, ~6e-8, times a few)


def peft_deltas(base: Path, adapters: dict[str, Path]) -> tuple[object, dict[str, dict[str, torch.Tensor]]]:
    """The adapters loaded into one PeftModel on `base` (fp32), asserting PEFT warns of no key, and every
    module's ΔW per adapter as PEFT computes it (get_delta_weight), fp64."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(adapters[name], adapter_name=name)
    keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not keys, keys
    deltas: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for path, layer in peft_model.named_modules():
        if isinstance(layer, LoraLayer):
            module = path.removeprefix("base_model.model.")
            for name in names:
                if name in layer.lora_A:
                    deltas[name][module] = layer.get_delta_weight(name).detach().double()
    return peft_model, deltas


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def test_combine_cat_is_peft_add_weighted_adapter_cat(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, rich: Path, partial: Path, tmp_path: Path
) -> None:
    """Different ranks, alphas, rsLoRA, patterns and target sets, a negative weight: PEFT's cat, module by module."""
    out = tmp_path / "cat"
    args = [
        "combine",
        str(rich),
        str(partial),
        "--weight",
        "0.7",
        "--weight",
        "-1.3",
        "--method",
        "cat",
        "-o",
        str(out),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    peft_model, inputs = peft_deltas(llama_dir, {"partial": partial, "rich": rich})
    peft_model.add_weighted_adapter(["partial", "rich"], [-1.3, 0.7], "cat", combination_type="cat")  # type: ignore[attr-defined]
    from peft.tuners.lora import LoraLayer

    expected = {
        p.removeprefix("base_model.model."): layer.get_delta_weight("cat").detach().double()
        for p, layer in peft_model.named_modules()  # type: ignore[attr-defined]
        if isinstance(layer, LoraLayer)
    }
    _, ours = peft_deltas(llama_dir, {"out": out})
    assert set(ours["out"]) == set(expected) and len(expected) == 14
    config = json.loads((out / "adapter_config.json").read_text())
    # Ranks 8 + 2 = 10 on q and v, 6 + 2 = 8 on down, 8 elsewhere: one lora_alpha = r = 8, q and v as patterns.
    assert config["lora_alpha"] == config["r"] == 8 and not config["alpha_pattern"] and not config["use_rslora"]
    assert set(config["rank_pattern"].values()) == {10} and len(config["rank_pattern"]) == 4
    for module, delta in expected.items():
        assert delta.abs().max() > 1e-3  # B ≠ 0: the oracle compares no zeros
        assert relative(ours["out"][module], delta) < 1e-5, module
    q = "model.layers.0.self_attn.q_proj"
    assert relative(ours["out"][q], 0.7 * inputs["rich"][q]) > 0.1  # the second adapter is in it


RULES = [("rank", 3.0), ("energy", 0.8), ("ratio", 3.0), ("fro", 0.9)]


@pytest.mark.parametrize(("kind", "value"), RULES)
def test_resize_rule_keeps_its_rank_at_the_optimum(
    llama_dir: Path, rich: Path, tmp_path: Path, kind: str, value: float
) -> None:
    """Per module: the rank the rule gives on the dense fp64 spectrum, and an error (measured on the output as PEFT
    loads it) within 1.0001 × the Eckart–Young optimum, equal to the table's."""
    out = tmp_path / "out"
    summary = lorasurgeon.resize(rich, out, **{kind: int(value) if kind == "rank" else value})
    _, found = peft_deltas(llama_dir, {"in": rich, "out": out})
    rows = {m.row.name: m for m in summary.modules}
    assert len(rows) == 14 and any(m.row.new_rank < m.row.old_rank for m in rows.values())
    for module, delta in found["in"].items():
        sigma = torch.linalg.svdvals(delta)
        rank = int(rows[module].row.old_rank)
        k = min(max(by_definition(sigma.tolist(), kind, value), 1), rank)
        optimum = float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())
        error = relative(found["out"][module], delta)
        assert rows[module].row.new_rank == k, module
        assert error <= 1.0001 * optimum + STORED, (module, error, optimum)
        assert rows[module].row.error == pytest.approx(error, abs=STORED)


def test_resize_params_is_the_budget_optimum(llama_dir: Path, rich: Path, tmp_path: Path) -> None:
    """--params N: ranks chosen together; the allocation the exact budget gives on the dense spectra."""
    _, found = peft_deltas(llama_dir, {"in": rich})
    modules = sorted(found["in"])
    budget = 9000
    summary = lorasurgeon.resize(rich, tmp_path / "out", params=budget)
    rows = {m.row.name: m.row for m in summary.modules}
    spectra = [torch.linalg.svdvals(found["in"][m])[: rows[m].old_rank] for m in modules]
    costs = [sum(found["in"][m].shape) for m in modules]
    assert [rows[m].new_rank for m in modules] == allocate_budget(spectra, costs, budget, min_rank=1)
    assert summary.params <= budget and len({r.new_rank for r in rows.values()}) > 1


def test_combine_svd_is_the_optimum_of_the_exact_sum(
    llama_dir: Path, rich: Path, partial: Path, tmp_path: Path
) -> None:
    """svd: the weighted sum (partial lacks four modules: they contribute zero) cut to rank 3, at its optimum."""
    out = tmp_path / "svd"
    summary = lorasurgeon.combine([rich, partial], out, weights=[120, 80], mean=True, rank=3, report_naive=True)
    _, found = peft_deltas(llama_dir, {"rich": rich, "partial": partial, "out": out})
    for m in summary.modules:
        name = m.row.name
        exact = 0.6 * found["rich"][name] + (0.4 * found["partial"][name] if name in found["partial"] else 0)
        sigma = torch.linalg.svdvals(exact)
        optimum = float(sigma[3:].square().sum().sqrt() / sigma.square().sum().sqrt())
        error = relative(found["out"][name], exact)
        assert m.row.new_rank == 3 and error <= 1.0001 * optimum + STORED, name
        assert m.row.error == pytest.approx(error, abs=STORED)
        assert m.naive is None  # the clients' ranks differ (8 or 6 against 2), and FedIT needs one


def ties_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023) on dense task vectors, written from the paper: trim each to its top
    ⌊density·n⌋ magnitudes, elect the sign of the summed mass per entry, average the agreeing entries."""
    trimmed = []
    for delta in deltas:
        flat = delta.flatten()
        keep = torch.argsort(flat.abs(), descending=True, stable=True)[: int(density * flat.numel())]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[keep] = True
        trimmed.append(torch.where(mask, flat, 0.0).reshape(delta.shape))
    sign = torch.sign(sum(trimmed))
    sign[sign == 0] = 1
    agree = [torch.sign(t) == sign for t in trimmed]
    total = sum(torch.where(a, w * t, 0.0) for a, w, t in zip(agree, weights, trimmed, strict=True))
    count = sum(a.double() for a in agree)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def test_ties_equals_an_independent_dense_ties(llama_dir: Path, rich: Path, partial: Path, tmp_path: Path) -> None:
    out = tmp_path / "ties"
    lorasurgeon.combine([rich, partial], out, weights=[1.0, 0.5], method="ties", density=0.3, rank=32)
    _, found = peft_deltas(llama_dir, {"rich": rich, "partial": partial, "out": out})
    for name, merged in found["out"].items():
        deltas = [found["rich"][name], found["partial"].get(name, torch.zeros_like(merged))]
        expected = ties_reference(deltas, [1.0, 0.5], 0.3)
        assert relative(merged, expected) < 1e-5, name
        assert relative(merged, deltas[0] + 0.5 * deltas[1]) > 0.1  # it trimmed and elected something


def test_dare_is_reproducible_with_its_seed(rich: Path, partial: Path, tmp_path: Path) -> None:
    runs = {}
    for label, seed in [("a", 7), ("b", 7), ("c", 8)]:
        lorasurgeon.combine([rich, partial], tmp_path / label, method="dare_ties", density=0.5, seed=seed, rank=4)
        runs[label] = read_tensors(tmp_path / label / "adapter_model.safetensors")
    assert runs["a"].keys() == runs["c"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_federated_cli_with_a_weights_file_and_fedits_error(
    capsys: pytest.CaptureFixture[str], llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three clients of one rank, sample counts in a CSV, --mean --rank 4 --report-naive --json: the exact FedAvg
    cut to rank 4, and FedIT's error as the dense route computes it."""
    clients = [
        save_adapter(llama_dir, tmp_path / "clients" / f"c{i}", seed=10 + i, r=4, lora_alpha=8) for i in range(3)
    ]
    counts = [50, 30, 20]
    (tmp_path / "counts.csv").write_text(
        "path,samples\n" + "".join(f"clients/c{i},{n}\n" for i, n in enumerate(counts))
    )
    monkeypatch.chdir(tmp_path)
    args = ["combine", *map(str, clients), "--weights", "counts.csv", "--mean", "--rank", "4", "--report-naive"]
    code, out, err = run_cli([*args, "--json", "-o", "global"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [a["weight"] for a in doc["adapters"]] == [0.5, 0.3, 0.2]
    _, found = peft_deltas(llama_dir, {f"c{i}": c for i, c in enumerate(clients)} | {"out": tmp_path / "global"})
    tensors = [read_tensors(c / "adapter_model.safetensors") for c in clients]
    weights = [0.5, 0.3, 0.2]
    for row in doc["modules"]:
        name, key = row["module"], f"base_model.model.{row['module']}"
        b = [2.0 * t[f"{key}.lora_B.weight"].double() for t in tensors]  # scale 8 / 4
        a = [t[f"{key}.lora_A.weight"].double() for t in tensors]
        exact = sum(w * bi @ ai for w, bi, ai in zip(weights, b, a, strict=True))  # fp64 from the factors
        fedit = sum(w * bi for w, bi in zip(weights, b, strict=True)) @ sum(
            w * ai for w, ai in zip(weights, a, strict=True)
        )
        assert row["naive_relative_error"] == pytest.approx(relative(fedit, exact), rel=1e-9)
        assert row["relative_error"] == pytest.approx(relative(found["out"][name], exact), abs=STORED)
        assert row["naive_relative_error"] > 0.1 and row["new_rank"] == 4
