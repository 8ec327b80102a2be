"""Non-LoRA PEFT tuners end to end, through lorasurgeon.merge / unmerge / check, against PEFT itself.

For each case of tuner_cases (a tiny Llama, GPT-2 or conv net with a PEFT adapter that is not the identity):
`lorasurgeon.merge` writes what PEFT's merge_and_unload() computes, tensor by tensor (fp32: within 1e-5 of each
tensor's largest value; the same tensors changed, every other one byte for byte the base's), the merged model
computes what PEFT's unmerged adapter computes, and `unmerge` gives the base back where the tuner is invertible.
A bf16 base is merged within one ulp of PEFT's fp32 merge rounded once. The inventory test lists the installed
PEFT's tuners and fails on one that is neither merged nor refused by name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import read_tensors
from test_oracle_peft import ulp_distance
from tuner_cases import CASE, CASES, Built, Case, build, load, params, run

import lorasurgeon
from lorasurgeon.errors import LorasurgeonError, MismatchError, UnsupportedError
from lorasurgeon.formats import load_adapter
from lorasurgeon.tuner_kinds import LORA_FORMS

pytestmark = pytest.mark.oracle
RTOL = 1e-5  # fp32 maths in another order than PEFT's: a few ulps of the largest value


Merged = tuple[Built, Path]  # a case's files, and lorasurgeon's merge of them


@pytest.fixture(scope="session")
def get(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each case's files and lorasurgeon's merge of them, built on first use and kept for the session."""
    cache: dict[str, Merged] = {}

    def files(case: Case) -> Merged:
        if case.id not in cache:
            where = tmp_path_factory.mktemp(case.id)
            b = build(case, where)
            out = where / ("merged.safetensors" if b.base.is_file() else "merged")
            lorasurgeon.merge(b.base, [b.adapter], out)
            cache[case.id] = (b, out)
        return cache[case.id]

    return files


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("case", params(CASES))
def test_merge_equals_peft_merge_and_unload(case: Case, get: Any) -> None:
    b, out = get(case)
    ours = read_tensors(out)
    changed = {n for n, t in ours.items() if not torch.equal(t, b.unmerged[n])}
    assert changed, "the adapter changed nothing"
    for name, tensor in ours.items():
        expected = b.oracle[name]
        assert relative_error(tensor, expected) <= RTOL, (name, relative_error(tensor, expected))
        # what we change PEFT changes; what we leave (AdaLoRA's rank-0 module) it leaves
        assert torch.equal(expected, b.unmerged[name]) == (name not in changed), name


@pytest.mark.gpu
@pytest.mark.parametrize("case", params([c for c in CASES if not c.slow]))
def test_cuda_merge_matches_peft(case: Case, get: Any, tmp_path: Path) -> None:
    """The maths follows its inputs' device: the same merge on CUDA (factors, W and the fp32 work there)."""
    b, cpu = get(case)
    out = tmp_path / cpu.name
    assert lorasurgeon.merge(b.base, [b.adapter], out, device="cuda").device.startswith("cuda")
    ours = read_tensors(out)
    assert any(not torch.equal(t, b.unmerged[n]) for n, t in ours.items())
    for name, tensor in ours.items():
        assert relative_error(tensor, b.oracle[name]) <= RTOL, name


@pytest.mark.parametrize("case", params(CASES))
def test_merged_model_computes_peft_unmerged_forward(case: Case, get: Any) -> None:
    """The merged checkpoint, loaded as a model, computes what PEFT's unmerged adapter computes: a merge that PEFT
    itself gets wrong (as it does for OFT on k×k convs, refused) would show here."""
    b, out = get(case)
    ours = run(load(case.arch, out), case.arch)
    assert relative_error(ours, b.forward) <= 10 * RTOL  # two layers of fp32 activations
    assert not torch.equal(run(load(case.arch, b.base), case.arch), b.forward)


INVERTIBLE = [c for c in CASES if c.invertible]


@pytest.mark.parametrize("case", params(INVERTIBLE))
def test_unmerge_gives_the_base_back(case: Case, get: Any, tmp_path: Path) -> None:
    b, out = get(case)
    restored = tmp_path / ("restored.safetensors" if out.suffix else "restored")
    summary = lorasurgeon.unmerge(out, b.adapter, restored)
    assert summary.changed
    merged_tensors, ours = read_tensors(out), read_tensors(restored)
    for name, tensor in ours.items():
        if torch.equal(merged_tensors[name], b.unmerged[name]):
            assert torch.equal(tensor, b.unmerged[name]), name  # untouched, copied
            continue
        # W' was rounded at the magnitude of its module's largest value (a bias at that of the weight, GLoRA's
        # b + W C), so W' − ΔW is exact to that magnitude's rounding.
        module = name.rpartition(".")[0]
        scale = max(float(t.abs().max()) for n, t in merged_tensors.items() if n.rpartition(".")[0] == module)
        assert float((tensor - b.unmerged[name]).abs().max()) <= RTOL * scale, name


@pytest.mark.parametrize("case", params([c for c in CASES if not c.invertible]))
def test_unmerge_of_what_cannot_be_undone_is_refused_by_name(case: Case, get: Any, tmp_path: Path) -> None:
    b, out = get(case)
    with pytest.raises(MismatchError, match=r"cannot be unmerged|cannot restore it"):
        lorasurgeon.unmerge(out, b.adapter, tmp_path / "restored")


@pytest.mark.parametrize("case_id", ["ia3", "oft", "vera-gpt2", "lokr", "glora"])
def test_bf16_within_one_ulp_of_peft_fp32_merge_rounded_once(case_id: str, tmp_path: Path) -> None:
    b = build(CASE[case_id], tmp_path, torch.bfloat16)
    out = tmp_path / "merged"
    lorasurgeon.merge(b.base, [b.adapter], out)
    ours, base = read_tensors(out), read_tensors(b.base)
    changed = [n for n, t in ours.items() if not torch.equal(t, base[n])]
    assert changed
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        assert int(ulp_distance(tensor, b.oracle[name].to(torch.bfloat16)).max()) <= 1, name


def test_dry_run_and_check_show_every_tuner_module(get: Any, tmp_path: Path) -> None:
    b, _ = get(CASE["ia3"])
    plan = lorasurgeon.check(b.base, [b.adapter])
    assert not plan.errors
    changed = {s.tensor.name: s for s in plan.changed}
    down, q = changed["model.layers.0.mlp.down_proj.weight"], changed["model.layers.0.self_attn.q_proj.bias"]
    assert [t.module.tuner for t in down.tuners] == ["IA3"] and q.tuners[0].param == "bias"
    assert len(changed) == 2 * 5  # q, v (weight and bias) and down_proj (weight) in two layers
    summary = lorasurgeon.merge(b.base, [b.adapter], tmp_path / "out", dry_run=True)
    assert summary.changed == 10 and not (tmp_path / "out").exists()


def _adapter_copy(built: Built, tmp_path: Path, **fields: Any) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(built.adapter, copy)
    config = copy / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **fields}))
    return copy


@pytest.mark.parametrize(
    ("case_id", "fields", "words"),
    [
        ("vera-gpt2", {"save_projection": False}, "saved without its projections"),
        ("ia3", {"feedforward_modules": None}, "per-architecture table"),
        ("oft", {"peft_version": "0.17.1"}, "Cayley-Neumann series of PEFT 0.17.1"),
        ("lokr", {"layer_replication": [[0, 2]]}, "replicated layers"),
        ("oft", {"target_modules": "all-linear"}, "expanded list"),
        ("road", {"variant": "road_3"}, "road_1"),
        ("fourierft", {"n_frequency": 49}, "n_frequency 49"),
        ("ia3", {"peft_type": "PSOFT"}, "SVD of the base weight"),
        ("ia3", {"peft_type": "NEW_TUNER"}, "not a tuner of PEFT 0.21"),
    ],
)
def test_what_the_files_do_not_support_is_refused_by_name(
    case_id: str, fields: dict[str, Any], words: str, get: Any, tmp_path: Path
) -> None:
    b, _ = get(CASE[case_id])
    adapter = _adapter_copy(b, tmp_path, **fields)
    with pytest.raises(LorasurgeonError, match=re.escape(words)):
        lorasurgeon.merge(b.base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = lorasurgeon.report(adapter, fail_on=["mismatch"])  # read leniently, the refusal is a finding
    assert report.fired and words in report.fired[0].reason


def test_a_selected_module_the_file_lacks_is_an_error(tmp_path: Path) -> None:
    """PEFT would give such a module a fresh initialisation (random, with init_weights false): no file says it."""
    from safetensors.torch import save_file

    b = build(CASE["oft"], tmp_path)
    weights = b.adapter / "adapter_model.safetensors"
    tensors = {k: v for k, v in read_tensors(weights).items() if "layers.1.self_attn.v_proj" not in k}
    save_file(tensors, weights, metadata={"format": "pt"})
    findings = lorasurgeon.check(b.base, [b.adapter]).errors
    assert len(findings) == 1 and findings[0].base_key == "model.layers.1.self_attn.v_proj.weight"
    assert "fresh initialisation" in findings[0].message


def test_a_product_tuner_must_be_alone_on_its_tensor(get: Any, tmp_path: Path) -> None:
    """IA3 scales W, a LoRA adds to it: which applies first decides the result, so the two are refused together,
    and a product's weight cannot be scaled; additive tuners sum with a LoRA like two LoRAs."""
    from builders import save_adapter

    ia3, _ = get(CASE["ia3"])
    lora = save_adapter(ia3.base, tmp_path / "lora", r=2, target_modules=["q_proj"])
    plan = lorasurgeon.check(ia3.base, [ia3.adapter, lora])
    assert {f.base_key for f in plan.errors} == {"model.layers.0.self_attn.q_proj.weight"} | {
        "model.layers.1.self_attn.q_proj.weight"
    }
    assert all("by a product" in f.message for f in plan.errors)
    with pytest.raises(MismatchError, match="weight 1 and scale 1"):
        lorasurgeon.merge(ia3.base, [ia3.adapter], tmp_path / "out", weights=[0.5])


def test_an_additive_tuner_sums_with_a_lora(get: Any, tmp_path: Path) -> None:
    from builders import peft_merged, save_adapter

    lokr, _ = get(CASE["lokr"])
    lora = save_adapter(lokr.base, tmp_path / "lora", r=2, target_modules=["q_proj"])
    lorasurgeon.merge(lokr.base, [lokr.adapter, lora], tmp_path / "out", weights=[0.5, 1.0])
    base, ours = read_tensors(lokr.base), read_tensors(tmp_path / "out")
    lora_merged = peft_merged(lokr.base, lora)
    for name, tensor in ours.items():
        expected = base[name] + 0.5 * (lokr.oracle[name] - base[name]) + (lora_merged[name] - base[name])
        assert relative_error(tensor, expected) <= RTOL, name
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], lokr.oracle[name]) and not torch.equal(ours[name], lora_merged[name])


def test_the_tuner_reader_keeps_what_the_config_says(get: Any) -> None:
    """Per-module values as PEFT derives them, selection, and what becomes replacements and token rows."""
    ia3 = load_adapter(get(CASE["ia3"])[0].adapter)
    modules = {m.module: m for m in ia3.tuner_modules}
    assert modules["model.layers.0.mlp.down_proj"].params["feedforward"] is True
    assert modules["model.layers.0.self_attn.q_proj"].writes == ("weight", "bias")
    selection = load_adapter(get(CASE["selection-layers"])[0].adapter)
    assert {m.module for m in selection.tuner_modules} == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }
    assert len(selection.ignored) == 4 * 4 and all("layers.0" in k or "layers.1.mlp" in k for k in selection.ignored)
    replacements = load_adapter(get(CASE["replacements"])[0].adapter)
    replaced = {f"{r.module}.{r.param}" for r in replacements.replacements}
    assert "lm_head.weight" in replaced and "model.layers.0.self_attn.q_proj.bias" in replaced
    tokens = load_adapter(get(CASE["trainable-tokens"])[0].adapter)
    assert [(r.module, r.indices) for r in tokens.token_rows] == [("model.embed_tokens", (1, 5, 7))]
    norms = load_adapter(get(CASE["ln-tuning"])[0].adapter)
    assert {r.param for r in norms.replacements} == {"weight"} and not norms.tuner_modules
    budget = {m.module: m for m in load_adapter(get(CASE["adalora-budget"])[0].adapter).tuner_modules}
    q = budget["model.layers.0.self_attn.q_proj"]
    assert q.factors["lora_E"].shape == (4, 1) and q.params == {"scaling": 4.0, "ranknum": 6.0, "rank": 4}


def test_a_key_peft_would_not_load_is_refused_by_name(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    b = build(CASE["ia3"], tmp_path)
    weights = b.adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    save_file({**tensors, "base_model.stray": torch.ones(2)}, weights)
    with pytest.raises(LorasurgeonError, match=r"base_model\.stray"):
        load_adapter(b.adapter)


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
    assert {_peft_type(c) for c in CASES} == TUNERS.keys(), "every merged tuner has an oracle case"


def test_the_readme_lists_every_tuner_with_what_lorasurgeon_does_with_it() -> None:
    from lorasurgeon.formats.peft_tuner_inventory import DESCRIPTIONS, REFUSED

    text = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {
        m.group(1): m.group(0) for m in re.finditer(r"^  \| .*? \(`([A-Z0-9_]+)`\) \|.*$", text, flags=re.MULTILINE)
    }
    assert rows.keys() == DESCRIPTIONS.keys()
    for peft_type, row in rows.items():
        convert = row.rstrip(" |").rpartition("|")[2]
        assert convert.strip().startswith("yes") == (peft_type in LORA_FORMS), row
    assert all(f"`{name}`" in text for name in REFUSED)


def _peft_type(case: Case) -> str:
    import peft

    return str(getattr(peft, case.config)(**case.kwargs).peft_type.value)


def test_unsupported_config_of_an_unknown_tuner_is_described_by_report(get: Any, tmp_path: Path) -> None:
    b, _ = get(CASE["ia3"])
    adapter = _adapter_copy(b, tmp_path, peft_type="POLY")
    report = lorasurgeon.report(adapter)
    assert [m.kind for m in report.modules] and all(m.kind == "poly" for m in report.modules)
    with pytest.raises(UnsupportedError, match="Polytropon"):
        load_adapter(adapter)


def test_report_says_what_the_tuner_is_and_what_lorasurgeon_does_with_it(get: Any) -> None:
    import jsonschema
    from test_report import SCHEMA

    from lorasurgeon.documents import report_doc

    b, _ = get(CASE["vera-gpt2"])
    report = lorasurgeon.report(b.adapter, base=b.base, fail_on=["mismatch", "rank>2"])
    jsonschema.validate(report_doc(report), SCHEMA)
    assert report.tuner is not None and report.tuner.name == "VeRA"
    assert report.tuner.unmerge.startswith("exact") and report.tuner.convert.startswith("exact")
    assert report.config["r"] == 4 and report.config["peft_type"] == "VERA" and "auto_mapping" not in report.config
    kinds = {m.module: m.kind for m in report.modules}
    assert kinds["vera_A"] == "shared" and kinds["transformer.h.0.attn.c_attn"] == "vera"
    assert [h.rule for h in report.fired] == ["rank>2"]  # the check against BASE finds nothing
    assert report.check is not None and not report.check.findings and report.check.touched_parameters
    ia3 = lorasurgeon.report(get(CASE["ia3"])[0].adapter).tuner
    assert ia3 is not None and ia3.convert.startswith("refused") and "AdaLoRA, VeRA" in ia3.convert


def test_fail_on_mismatch_fires_for_what_merge_refuses_against_the_base(tmp_path: Path) -> None:
    """PEFT's OFT on a 3×3 conv merges unlike its forward: check and merge refuse it, report --base says so."""
    import peft
    from safetensors.torch import save_file
    from tuner_cases import make_model

    model = make_model("conv")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "base.safetensors")
    config = peft.OFTConfig(target_modules=["conv1"], oft_block_size=4, init_weights=False)
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "oft")
    errors = lorasurgeon.check(tmp_path / "base.safetensors", [tmp_path / "oft"]).errors
    assert len(errors) == 1 and "merge differs from its forward" in errors[0].message
    report = lorasurgeon.report(tmp_path / "oft", base=tmp_path / "base.safetensors", fail_on=["mismatch"])
    assert report.fired and "merge differs from its forward" in report.fired[0].reason
    assert not lorasurgeon.report(tmp_path / "oft", fail_on=["mismatch"]).fired  # the adapter alone is fine


# The LoRA form is written for Linear and Conv1D modules, without the full tensors a LoRA would not carry.
CONVERTIBLE = [c for c in CASES if _peft_type(c) in LORA_FORMS and c.arch != "conv" and c.id != "replacements"]


@pytest.mark.parametrize("case", params(CONVERTIBLE))
def test_convert_writes_the_exact_lora_form_peft_merges_the_same(case: Case, get: Any, tmp_path: Path) -> None:
    """The LoRA form's merge (by PEFT itself, and by lorasurgeon) equals PEFT's merge of the tuner."""
    from builders import model_class

    b, _ = get(case)
    lora = tmp_path / "lora"
    summary = lorasurgeon.convert(b.adapter, lora, to="peft", base=b.base)
    assert summary.modules and json.loads((lora / "adapter_config.json").read_text())["peft_type"] == "LORA"
    out = tmp_path / ("merged.safetensors" if b.base.is_file() else "merged")
    lorasurgeon.merge(b.base, [lora], out)
    ours = read_tensors(out)
    assert any(not torch.equal(t, b.unmerged[n]) for n, t in ours.items())
    for name, tensor in ours.items():
        assert relative_error(tensor, b.oracle[name]) <= RTOL, name
    if case.arch != "conv":  # and PEFT loads the written LoRA and computes the tuner's forward
        from peft import PeftModel

        model = PeftModel.from_pretrained(model_class(case.arch).from_pretrained(b.base), lora)
        assert relative_error(run(model, case.arch), b.forward) <= 10 * RTOL


def test_convert_refuses_a_tuner_without_an_exact_lora_form_naming_those_with_one(get: Any, tmp_path: Path) -> None:
    b, _ = get(CASE["oft"])
    with pytest.raises(UnsupportedError, match="exact LoRA form exists for AdaLoRA, VeRA"):
        lorasurgeon.convert(b.adapter, tmp_path / "lora", to="peft", base=b.base)
    vera, _ = get(CASE["vera-gpt2"])
    with pytest.raises(LorasurgeonError, match="take their shapes from the base layers"):
        lorasurgeon.convert(vera.adapter, tmp_path / "lora", to="peft")
    replaced, _ = get(CASE["replacements"])
    with pytest.raises(UnsupportedError, match="replaces a base tensor in full"):
        lorasurgeon.convert(replaced.adapter, tmp_path / "lora", to="peft", base=replaced.base)
    conv, _ = get(CASE["adalora-conv"])
    with pytest.raises(UnsupportedError, match="Linear and Conv1D modules"):
        lorasurgeon.convert(conv.adapter, tmp_path / "lora", to="peft", base=conv.base)
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("case_id", ["ln-tuning", "trainable-tokens"])
def test_convert_copies_a_tuner_that_sets_tensors_from_peft_to_peft(case_id: str, get: Any, tmp_path: Path) -> None:
    b, merged_out = get(CASE[case_id])
    lorasurgeon.convert(b.adapter, tmp_path / "copy", to="peft")
    lorasurgeon.merge(b.base, [tmp_path / "copy"], tmp_path / "merged")
    ours, before = read_tensors(tmp_path / "merged"), read_tensors(merged_out)
    assert all(torch.equal(t, before[n]) for n, t in ours.items())
    with pytest.raises(UnsupportedError, match="kohya"):
        lorasurgeon.convert(b.adapter, tmp_path / "k.safetensors", to="kohya")


def test_what_the_values_refuse_is_refused_by_name(tmp_path: Path) -> None:
    """NaN in a tuner's tensor is found by check (a warning with allow_nonfinite); an IA3 vector with a zero entry
    erased part of W, so unmerge refuses it, writing nothing."""
    from safetensors.torch import save_file

    b = build(CASE["ia3"], tmp_path)
    weights = b.adapter / "adapter_model.safetensors"
    tensors = read_tensors(weights)
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    tensors[key][0, 3] = 0.0
    save_file(tensors, weights, metadata={"format": "pt"})
    lorasurgeon.merge(b.base, [b.adapter], tmp_path / "merged")
    with pytest.raises(UnsupportedError, match="zero entry"):
        lorasurgeon.unmerge(tmp_path / "merged", b.adapter, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()
    tensors[key][0, 3] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    errors = lorasurgeon.check(b.base, [b.adapter]).errors
    assert len(errors) == 1 and errors[0].adapter_key == key and "NaN/Inf" in errors[0].message
    summary = lorasurgeon.merge(b.base, [b.adapter], tmp_path / "nan", dry_run=True, allow_nonfinite=True)
    assert any(w.adapter_key == key for w in summary.plan.warnings)
