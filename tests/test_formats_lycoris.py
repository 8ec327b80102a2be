"""LyCORIS LoHa and LoKr files (kohya module names, FORMATS.md §5.1), and LyCORIS DoRA (`dora_scale`, §5.3) on
them and on kohya LoRA, merged into tiny SD-shaped state dicts; every LyCORIS variant lorasurgeon refuses, by name.

Two oracles, neither of them our code. (1) ΔW computed here in fp64 from LyCORIS' definitions, written out
with matmul, einsum and torch.kron on the unflattened conv layout (LoHa: (w1a @ w1b) ⊙ (w2a @ w2b); LoKr:
kron(w1, w2) with w1 unsqueezed over the kernel, as LyCORIS' make_kron does), times alpha / rank (LoKr of two
full matrices: 1); DoRA: dora_scale · V / (‖V‖ + fp32 ε), V = W + ΔW. (2) Files written by the real LyCORIS
modules (lycoris-lora, a test dependency), whose merged weight is LyCORIS' own: `get_weight`, the update its
forward pass applies, then `apply_weight_decompose` for DoRA. (LyCORIS 4.1.3's `merge_to` multiplies
the scale in twice, alpha²/r², disagreeing with its own forward; lorasurgeon follows the forward, as ComfyUI
and A1111 do.) Tolerance as in test_formats_kohya.py: fp32 within 1e-6 of the tensor's max magnitude; bf16
within 1 ulp of the fp64 result, i.e. rounded once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from builders import read_tensors, refused, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_formats_kohya import UNET, kohya_name, save_base

import lorasurgeon
from lorasurgeon import lycoris
from lorasurgeon.errors import LorasurgeonError, UnsupportedError
from lorasurgeon.formats import kohya

Factors = dict[str, torch.Tensor]
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"  # (32, 32)
FF = "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"  # (64, 32)
PROJ_IN = "down_blocks.0.attentions.0.proj_in.weight"  # (32, 16, 1, 1)
CONV = "down_blocks.0.resnets.0.conv1.weight"  # (16, 8, 3, 3)


Shapes = dict[str, tuple[int, ...]]


def loha(out: int, rank: int, cols: int) -> Shapes:
    return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, cols), "hada_w2_a": (out, rank), "hada_w2_b": (rank, cols)}


def loha_tucker(out: int, rank: int, inp: int, kernel: tuple[int, ...]) -> Shapes:
    core = (rank, rank, *kernel)
    return {"hada_w1_a": (rank, out), "hada_w1_b": (rank, inp), "hada_t1": core} | {
        "hada_w2_a": (rank, out),
        "hada_w2_b": (rank, inp),
        "hada_t2": core,
    }


def random(shapes: Shapes) -> Factors:
    return {role: torch.randn(shape) * 0.5 for role, shape in shapes.items()}


# LyCORIS layouts: LoHa w_a (out, r), w_b (r, in·∏k); Tucker w_a (r, out), w_b (r, in), t (r, r, *k).
# LoKr out = a·b, in = c·d: w1 (a, c) or w1_a (a, r) @ w1_b (r, c); w2 (b, d, *k) or (b, d·∏k), or
# w2_a (b, r) @ w2_b (r, d·∏k), or Tucker t2 (r, r, *k) between w2_a (r, b) and w2_b (r, d).
CASES: dict[str, tuple[str, Shapes, float | None, float]] = {  # id: (base tensor, shapes, stored alpha, scale)
    "loha-linear": (TO_Q, loha(32, 4, 32), 2.0, 0.5),
    "loha-conv1x1-no-alpha": (PROJ_IN, loha(32, 2, 16), None, 1.0),
    "loha-conv3x3": (CONV, loha(16, 2, 8 * 9), 1.0, 0.5),
    "loha-tucker": (CONV, loha_tucker(16, 2, 8, (3, 3)), 3.0, 1.5),
    "lokr-w2-lowrank": (FF, {"lokr_w1": (8, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}, 1.0, 0.5),
    "lokr-both-lowrank": (
        TO_Q,
        {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
        4.0,
        4.0,
    ),
    "lokr-full-full-scale-1": (TO_Q, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}, 8.0, 1.0),
    "lokr-conv-full-w2": (CONV, {"lokr_w1": (4, 2), "lokr_w2": (4, 4, 3, 3)}, 2.0, 1.0),
    "lokr-conv-flat-w2": (CONV, {"lokr_w1": (4, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4 * 9)}, 0.5, 0.5),
    "lokr-conv-tucker": (
        CONV,
        {"lokr_w1": (4, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 4)},
        1.0,
        0.5,
    ),
}


def expected_delta(kind: str, f: Factors, shape: torch.Size) -> torch.Tensor:
    """ΔW (before the scale) from LyCORIS' definitions in fp64, in the base weight's layout."""
    d = {role: t.double() for role, t in f.items()}

    def product(up: str, down: str, core: str) -> torch.Tensor:
        if core in d:  # (r, r, *k) core between (r, out) and (r, in)
            return torch.einsum("ijkl,ip,jq->pqkl", d[core], d[up], d[down])
        return d[up] @ d[down].reshape(d[down].shape[0], -1)  # (out, r) @ (r, in·∏k)

    if kind == "loha":
        return (product("hada_w1_a", "hada_w1_b", "hada_t1") * product("hada_w2_a", "hada_w2_b", "hada_t2")).reshape(
            shape
        )
    w1 = d["lokr_w1"] if "lokr_w1" in d else d["lokr_w1_a"] @ d["lokr_w1_b"]
    b, d_in = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
    w2 = d["lokr_w2"] if "lokr_w2" in d else product("lokr_w2_a", "lokr_w2_b", "lokr_t2")
    w2 = w2.reshape(b, d_in, *shape[2:]).contiguous()  # unflattened (b, d, *k); kron needs it contiguous
    return torch.kron(w1.reshape(*w1.shape, *[1] * (len(shape) - 2)), w2)


def save_lycoris(path: Path, modules: dict[str, tuple[Factors, float | None]]) -> None:
    tensors = {}
    for name, (factors, alpha) in modules.items():
        tensors |= {f"{name}.{role}": t.contiguous() for role, t in factors.items()}
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata={"ss_network_module": "lycoris.kohya"})


def unet(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, torch.Tensor]]:
    (tmp_path / "unet").mkdir()
    base = save_base(tmp_path / "unet" / "diffusion_pytorch_model.safetensors", UNET)
    if dtype != torch.float32:
        base = {n: t.to(dtype) for n, t in base.items()}
        save_file(base, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    return tmp_path / "unet", base


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two bf16 tensors."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)

    return (ordered(a) - ordered(b)).abs()


def assert_merged(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """`want` (fp64) for the merged tensors, every other tensor byte for byte, each merged one changed."""
    for name, tensor in out.items():
        if name not in want:
            assert torch.equal(tensor, base[name]), name
            continue
        assert tensor.dtype == base[name].dtype and not torch.equal(tensor, base[name]), name
        if tensor.dtype == torch.float32:
            assert (tensor.double() - want[name]).abs().max().item() <= 1e-6 * want[name].abs().max().item(), name
        else:
            assert ulp_distance(tensor, want[name].to(tensor.dtype)).max().item() <= 1, name


@pytest.mark.parametrize("case", CASES)
def test_merges_and_unmerges_exactly(tmp_path: Path, case: str) -> None:
    target, shapes, alpha, scale = CASES[case]
    kind = "loha" if "hada_w1_a" in shapes else "lokr"
    base_dir, base = unet(tmp_path)
    torch.manual_seed(2)
    factors = random(shapes)
    save_lycoris(tmp_path / "lyco.safetensors", {kohya_name("lora_unet", target): (factors, alpha)})
    summary = lorasurgeon.merge(base_dir, [tmp_path / "lyco.safetensors"], tmp_path / "merged", weights=[0.75])
    ((term,),) = [s.terms for s in summary.plan.steps if s.terms]
    assert (term.module.kind, term.module.scale) == (kind, scale)
    want = base[target].double() + 0.75 * scale * expected_delta(kind, factors, base[target].shape)
    assert_merged(read_tensors(tmp_path / "merged"), base, {target: want})  # changed: unmerge below is no no-op
    # LoHa and LoKr are additive: unmerge takes the same ΔW back out, to fp32 rounding.
    lorasurgeon.unmerge(tmp_path / "merged", tmp_path / "lyco.safetensors", tmp_path / "back", scale=0.75)
    back = read_tensors(tmp_path / "back")
    assert all(torch.equal(back[n], base[n]) for n in base if n != target)
    assert (back[target] - base[target]).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_bf16_base_is_rounded_once(tmp_path: Path) -> None:
    base_dir, base = unet(tmp_path, torch.bfloat16)
    torch.manual_seed(3)
    modules, want = {}, {}
    for case in ("loha-tucker", "lokr-w2-lowrank", "loha-linear"):
        target, shapes, alpha, scale = CASES[case]
        kind, factors = "loha" if "hada_w1_a" in shapes else "lokr", random(shapes)
        modules[kohya_name("lora_unet", target)] = (factors, alpha)
        want[target] = base[target].double() + scale * expected_delta(kind, factors, base[target].shape)
    save_lycoris(tmp_path / "lyco.safetensors", modules)
    lorasurgeon.merge(base_dir, [tmp_path / "lyco.safetensors"], tmp_path / "out")
    assert_merged(read_tensors(tmp_path / "out"), base, want)


@settings(max_examples=40, deadline=None)
@given(
    a=st.integers(1, 4),
    b=st.integers(1, 4),
    c=st.integers(1, 4),
    d=st.integers(1, 4),
    kernel=st.sampled_from([(), (1, 1), (3, 3), (2, 3, 1)]),
)
def test_lokr_flattened_kron_is_the_kernel_wise_kron(a: int, b: int, c: int, d: int, kernel: tuple[int, ...]) -> None:
    """kron((a, c), (b, d·∏k)) reshaped to (a·b, c·d, *k) is kron(w1 over the kernel, (b, d, *k)): the flattened
    conv layout LyCORIS stores and the layout of the weight agree, for every factorisation."""
    torch.manual_seed(a * 1000 + b * 100 + c * 10 + d)
    w1, w2 = torch.randn(a, c, dtype=torch.float64), torch.randn(b, d, *kernel, dtype=torch.float64)
    shape = (a * b, c * d, *kernel)
    ours = lycoris.lokr_delta({"lokr_w1": w1, "lokr_w2": w2.reshape(b, -1)}, 1.0, shape)
    want = torch.kron(w1.reshape(a, c, *[1] * len(kernel)), w2)
    assert ours.shape == want.shape and torch.allclose(ours.double(), want, rtol=1e-6, atol=1e-6)
    assert lycoris.layout("lokr", {"lokr_w1": (a, c), "lokr_w2": (b, d * (kernel[0] if kernel else 1))}).rank is None


# --- the real LyCORIS: files its modules write, merged to the ΔW its forward pass applies ------------------------


def lycoris_module(kind: str, weight: torch.Tensor, **options: object) -> torch.nn.Module:
    """A LyCORIS LoHa / LoKr module on a Linear or Conv2d holding `weight`, every factor random and non-zero."""
    modules = pytest.importorskip("lycoris.modules")
    if weight.dim() == 2:
        layer: torch.nn.Module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    else:
        layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    cls = {"loha": modules.LohaModule, "lokr": modules.LokrModule, "locon": modules.LoConModule}[kind]
    with torch.no_grad():
        layer.weight.copy_(weight)
        module = cls("lora", layer, 1.0, **options)
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    return module


LYCORIS_MODULES: dict[str, tuple[str, str, dict[str, object]]] = {
    "loha-linear": (FF, "loha", {"lora_dim": 4, "alpha": 2.0}),
    "loha-conv": (CONV, "loha", {"lora_dim": 2, "alpha": 1.0}),
    "loha-tucker": (CONV, "loha", {"lora_dim": 2, "alpha": 3.0, "use_tucker": True}),
    "lokr-linear": (FF, "lokr", {"lora_dim": 2, "alpha": 1.0}),
    "lokr-decompose-both": (TO_Q, "lokr", {"lora_dim": 1, "alpha": 0.5, "decompose_both": True}),
    "lokr-full-matrix": (TO_Q, "lokr", {"lora_dim": 4, "alpha": 8.0, "full_matrix": True}),
    "lokr-conv": (CONV, "lokr", {"lora_dim": 1, "alpha": 2.0}),
    "lokr-conv-tucker": (CONV, "lokr", {"lora_dim": 1, "alpha": 2.0, "use_tucker": True, "decompose_both": True}),
    "lokr-1x1": (PROJ_IN, "lokr", {"lora_dim": 2, "alpha": 1.0, "factor": 4}),
    "locon-tucker": (CONV, "locon", {"lora_dim": 2, "alpha": 1.0, "use_tucker": True}),
    "dora-locon-tucker": (CONV, "locon", {"lora_dim": 3, "alpha": 2.0, "use_tucker": True, "weight_decompose": True}),
    "dora-locon-linear": (FF, "locon", {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}),
    "dora-locon-conv-per-input": (CONV, "locon", {"lora_dim": 2, "weight_decompose": True, "wd_on_out": False}),
    "dora-loha-conv": (CONV, "loha", {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}),
    "dora-loha-linear-per-input": (FF, "loha", {"lora_dim": 2, "weight_decompose": True, "wd_on_out": False}),
    "dora-lokr-linear": (TO_Q, "lokr", {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}),
}


def lycoris_merged(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """W + ΔW as LyCORIS' forward pass builds it (LoCon's get_diff_weight agrees; LoHa/LoKr ones square the
    scale), then its DoRA rescale when the module has one; in fp64."""
    module = module.double()
    with torch.no_grad():
        if hasattr(module, "get_weight"):
            merged = weight.double() + module.get_weight(weight.shape)
        else:
            merged = weight.double() + module.get_diff_weight(1.0)[0].reshape(weight.shape)
        return module.apply_weight_decompose(merged, 1.0) if getattr(module, "wd", False) else merged


@pytest.mark.parametrize("case", LYCORIS_MODULES)
def test_files_written_by_lycoris_merge_to_its_own_delta(tmp_path: Path, case: str) -> None:
    target, kind, options = LYCORIS_MODULES[case]
    base_dir, base = unet(tmp_path)
    torch.manual_seed(4)
    module = lycoris_module(kind, base[target], **options)
    name = kohya_name("lora_unet", target)
    file = {f"{name}.{key}": t.detach().float().contiguous() for key, t in module.state_dict().items()}
    if case == "lokr-full-matrix":  # LokrModule gives two full matrices scale 1 whatever the alpha: test that too
        assert getattr(module, "scale", None) == 1.0
        file[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(file, tmp_path / "lyco.safetensors")
    lorasurgeon.merge(base_dir, [tmp_path / "lyco.safetensors"], tmp_path / "out")
    assert ("dora_scale" in module.state_dict()) == case.startswith("dora")
    assert_merged(read_tensors(tmp_path / "out"), base, {target: lycoris_merged(module, base[target])})


# --- DoRA (dora_scale): W' = dora_scale · V / (‖V‖ + ε) with V = W + scale·ΔW --------------------------------


def expected_dora(merged: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' weight decomposition in fp64: norms per output row for (out, 1, …), per input for (1, in, …)."""
    v = merged.double()
    if dora_scale.shape[0] == v.shape[0]:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(dora_scale.shape)
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(dora_scale.shape)
    return v * (dora_scale.double() / (norm + torch.finfo(torch.float32).eps))


@pytest.mark.parametrize("per_output", [True, False], ids=["per-output", "per-input"])
@pytest.mark.parametrize("case", ["loha-conv3x3", "lokr-w2-lowrank", "lora-conv3x3"])
def test_dora_scale_is_merged_exactly(tmp_path: Path, case: str, per_output: bool) -> None:
    base_dir, base = unet(tmp_path)
    torch.manual_seed(7)
    if case == "lora-conv3x3":  # plain kohya LoRA with LyCORIS DoRA
        target, alpha = CONV, 1.0
        factors = random({"lora_down.weight": (2, 8, 3, 3), "lora_up.weight": (16, 2, 1, 1)})
        up, down = factors["lora_up.weight"].double(), factors["lora_down.weight"].double()
        delta = 0.5 * (up.reshape(16, 2) @ down.reshape(2, -1))  # alpha / r = 1 / 2
    else:
        target, shapes, alpha, scale = CASES[case]
        factors = random(shapes)
        delta = scale * expected_delta("loha" if "hada_w1_a" in shapes else "lokr", factors, base[target].shape)
    shape = base[target].shape
    ones = [1] * (len(shape) - 1)
    dora_scale = torch.rand(shape[0], *ones) + 0.5 if per_output else torch.rand(1, shape[1], *ones[1:]) + 0.5
    save_lycoris(
        tmp_path / "lyco.safetensors", {kohya_name("lora_unet", target): (factors | {"dora_scale": dora_scale}, alpha)}
    )
    lorasurgeon.merge(base_dir, [tmp_path / "lyco.safetensors"], tmp_path / "out")
    want = expected_dora(base[target].double() + delta.reshape(shape), dora_scale)
    assert_merged(read_tensors(tmp_path / "out"), base, {target: want})
    plain = base[target].double() + delta.reshape(shape)
    assert not torch.allclose(want, plain, atol=1e-3)  # guard: the rescale matters


def test_dora_scale_refusals_name_the_tensor(tmp_path: Path) -> None:
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", TO_Q)
    factors = random(CASES["loha-linear"][1])
    save_lycoris(tmp_path / "dora.safetensors", {name: (factors | {"dora_scale": torch.rand(32, 1) + 0.5}, 2.0)})
    with pytest.raises(LorasurgeonError, match="DoRA cannot be unmerged") as error:
        lorasurgeon.unmerge(base_dir, tmp_path / "dora.safetensors", tmp_path / "out")
    assert f"{name}.hada_w1_a -> {TO_Q}" in str(error.value) and not (tmp_path / "out").exists()
    with pytest.raises(LorasurgeonError, match="weight 1 and scale 1"):
        lorasurgeon.merge(base_dir, [tmp_path / "dora.safetensors"], tmp_path / "out", weights=[0.5])
    save_lycoris(tmp_path / "bad.safetensors", {name: (factors | {"dora_scale": torch.ones(32, 2)}, 2.0)})
    message = refused(base_dir, tmp_path / "bad.safetensors", tmp_path / "out", "neither per output nor per input")
    assert f"{name}.dora_scale -> {TO_Q}" in message


# --- check and report -------------------------------------------------------------------------------------------


def test_report_and_check_describe_loha_and_lokr(tmp_path: Path) -> None:
    base_dir, _ = unet(tmp_path)
    torch.manual_seed(5)
    cases = [CASES["loha-tucker"], CASES["lokr-w2-lowrank"]]
    modules = {kohya_name("lora_unet", target): (random(shapes), alpha) for target, shapes, alpha, _ in cases}
    save_lycoris(tmp_path / "lyco.safetensors", modules)
    report = lorasurgeon.report(tmp_path / "lyco.safetensors", base=base_dir, stats=True)
    assert report.kind == "adapter" and report.format == "kohya" and not report.findings
    loha, lokr = report.modules  # sorted by module name: down_blocks... before mid_block...
    assert (loha.kind, loha.rank, loha.alpha, loha.scale, loha.base_shape) == ("loha", 2, 3.0, 1.5, (16, 8, 3, 3))
    assert (lokr.kind, lokr.rank, lokr.alpha, lokr.scale, lokr.base_shape) == ("lokr", 2, 1.0, 0.5, (64, 32))
    assert loha.parameters == 2 * (2 * 16 + 2 * 8 + 2 * 2 * 9) and lokr.parameters == 8 * 4 + 8 * 2 + 2 * 8
    factors = modules[lokr.module][0]
    dense = 0.5 * expected_delta("lokr", factors, torch.Size((64, 32)))
    assert lokr.delta_norm == pytest.approx(torch.linalg.matrix_norm(dense).item(), rel=1e-6)
    assert lokr.delta_spectral_norm == pytest.approx(torch.linalg.matrix_norm(dense, 2).item(), rel=1e-6)
    assert report.check is not None and report.check.findings == ()
    plan = lorasurgeon.check(base_dir, [tmp_path / "lyco.safetensors"])
    assert not plan.errors and sorted(t.module.kind for s in plan.steps for t in s.terms) == ["loha", "lokr"]


def test_cli_check_and_report_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, _ = unet(tmp_path)
    torch.manual_seed(6)
    target, shapes, alpha, _ = CASES["loha-conv3x3"]
    save_lycoris(tmp_path / "lyco.safetensors", {kohya_name("lora_unet", target): (random(shapes), alpha)})
    code, out, _ = run_cli(["check", str(base_dir), str(tmp_path / "lyco.safetensors"), "--json"], capsys)
    assert code == 0 and "loha" in out
    code, out, _ = run_cli(["report", str(tmp_path / "lyco.safetensors"), "--json"], capsys)
    (module,) = json.loads(out)["adapter"]["modules"]
    assert code == 0 and module["kind"] == "loha" and module["base_shape"] == [16, 72]


# --- refusals: each names the tensor and the reason; nothing is written ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"on_input": torch.tensor(True), "weight": torch.ones(32)}, "(IA)³"),
        ({"a1.weight": torch.ones(2, 32), "a2.weight": torch.ones(32, 2), "b1.weight": torch.ones(2, 32),
          "b2.weight": torch.ones(32, 2)}, "GLoRA"),
        ({"oft_blocks": torch.ones(4, 8, 8), "rescale": torch.ones(32, 1)}, "OFT / BOFT"),
        ({"diff": torch.ones(32, 32)}, "full-weight difference"),
        ({"w_norm": torch.ones(32)}, "normalization-layer"),
        ({"lokr_t1": torch.ones(2, 2)}, "not a LoRA, LoHa or LoKr tensor"),
    ],
    ids=["ia3", "glora", "oft", "full", "norm", "unknown"],
)  # fmt: skip
def test_refuses_lycoris_variants_by_name(tmp_path: Path, extra: Factors, reason: str) -> None:
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", TO_Q)
    save_lycoris(tmp_path / "lyco.safetensors", {name: (extra, 1.0)})
    message = refused(base_dir, tmp_path / "lyco.safetensors", tmp_path / "out", re.escape(reason))
    refusing = [f"{name}.{role}" for role in extra if f"{name}.{role}" in message]
    assert len(refusing) == 1 and reason in message, message
    with pytest.raises(UnsupportedError):
        lorasurgeon.check(base_dir, [tmp_path / "lyco.safetensors"])
    report = lorasurgeon.report(tmp_path / "lyco.safetensors", base=base_dir)
    assert report.check is not None and reason in report.check.findings[0].message  # check describes it too


def test_refuses_mixed_algorithms_in_one_module(tmp_path: Path) -> None:
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", TO_Q)
    lora = {"lora_down.weight": torch.ones(2, 32), "lora_up.weight": torch.ones(32, 2)}
    save_lycoris(tmp_path / "lyco.safetensors", {name: ({**lora, **random(CASES["loha-linear"][1])}, 1.0)})
    message = refused(base_dir, tmp_path / "lyco.safetensors", tmp_path / "out", "different algorithms")
    assert f"{name}.lora_down.weight" in message and f"{name}.hada_w1_a" in message


@pytest.mark.parametrize(
    ("target", "shapes", "reason"),
    [
        (TO_Q, loha(32, 4, 16), "the LoHa ΔW is [32, 16], which does not fit the base shape [32, 32]"),
        (TO_Q, {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 2), "hada_w2_b": (2, 32)},
         "has hada_w1 factors giving [32, 32] at rank 4 but hada_w2 factors giving [32, 32] at rank 2"),
        (TO_Q, {k: v for k, v in loha(32, 4, 32).items() if k != "hada_w2_b"}, "lacks hada_w2_b"),
        (CONV, {k: v for k, v in loha_tucker(16, 2, 8, (3, 3)).items() if k != "hada_t2"}, "one Tucker core"),
        (PROJ_IN, loha_tucker(16, 2, 8, (3, 3)),
         "the LoHa ΔW is [16, 8, 3, 3], which does not fit the base shape [32, 16, 1, 1]"),
        (TO_Q, {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
         "has lokr_w1 factors of rank 1 but lokr_w2 factors of rank 2"),
        (TO_Q, {"lokr_w1": (4, 4), "lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2": (8, 8)},
         "holds both lokr_w1 and lokr_w1_a, lokr_w1_b"),
        (FF, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)},
         "the LoKr ΔW is [32, 32], which does not fit the base shape [64, 32]"),
        (TO_Q, {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (3, 8)}, "which do not multiply"),
    ],
    ids=["loha-shape", "loha-ranks", "loha-missing", "loha-one-core", "loha-kernel", "lokr-ranks", "lokr-ambiguous",
         "lokr-shape", "lokr-inner"],
)  # fmt: skip
def test_refuses_factors_that_do_not_fit_with_the_keys(
    tmp_path: Path, target: str, shapes: Shapes, reason: str
) -> None:
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", target)
    save_lycoris(tmp_path / "lyco.safetensors", {name: (random(shapes), 1.0)})
    message = refused(base_dir, tmp_path / "lyco.safetensors", tmp_path / "out", re.escape(reason))
    first = next(iter(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in shapes))
    assert f"{name}.{first} -> {target}" in message and reason in message, message
    (error,) = lorasurgeon.check(base_dir, [tmp_path / "lyco.safetensors"]).errors
    assert (error.adapter_key, error.base_key) == (f"{name}.{first}", target)


def test_nan_in_a_factor_is_refused_naming_it(tmp_path: Path) -> None:
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", FF)
    factors = random(CASES["lokr-w2-lowrank"][1])
    factors["lokr_w2_b"][0, 3] = float("nan")
    save_lycoris(tmp_path / "lyco.safetensors", {name: (factors, 1.0)})
    message = refused(base_dir, tmp_path / "lyco.safetensors", tmp_path / "out", "NaN")
    assert f"{name}.lokr_w2_b -> {FF}" in message


def test_lycoris_only_file_is_never_read_as_peft() -> None:
    """A LoHa file has no lora_down key; its kohya module names alone make it kohya, so it is never taken for a
    PEFT export of "replacement" tensors (test_refuses_lycoris_variants_by_name shows the same for (IA)³ etc.)."""
    assert kohya.is_kohya(["lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"])
    assert kohya.is_kohya(["lora_unet_mid_block_attentions_0_proj_in.on_input"])
    assert not kohya.is_kohya(["base_model.model.model.layers.0.q_proj.lora_A.weight", "unet.x.lora_A.weight"])


@pytest.mark.parametrize("to", ["peft", "kohya", "diffusers"])
def test_convert_refuses_lycoris_factors_and_dora_scale_by_name(tmp_path: Path, to: str) -> None:
    """convert writes LoRA factors only: a LoHa / LoKr module, or a kohya dora_scale (not PEFT's magnitude
    convention), is refused by tensor name, for every target, before anything is written."""
    base_dir, _ = unet(tmp_path)
    target, shapes, alpha, _ = CASES["loha-linear"]
    save_lycoris(tmp_path / "loha.safetensors", {kohya_name("lora_unet", target): (random(shapes), alpha)})
    lora = random({"lora_down.weight": (2, 8, 3, 3), "lora_up.weight": (16, 2, 1, 1)})
    dora = {kohya_name("lora_unet", CONV): (lora | {"dora_scale": torch.rand(16, 1, 1, 1) + 0.5}, 1.0)}
    save_lycoris(tmp_path / "dora.safetensors", dora)
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    reasons = {"loha": "LyCORIS LoHa / LoKr / Tucker LoCon factor", "dora": "dora_scale, which convert does not carry"}
    for name, reason in reasons.items():
        with pytest.raises(UnsupportedError, match=reason) as error:
            lorasurgeon.convert(tmp_path / f"{name}.safetensors", out, to=to, base=base_dir, component="lora_unet")
        assert kohya_name("lora_unet", target if name == "loha" else CONV) in str(error.value)
        assert not out.exists()


def test_a_tucker_locon_must_fit_its_base(tmp_path: Path) -> None:
    """A 3×3 Tucker LoCon (lora_mid) names a conv kernel: on a Linear weight it is a misfit, named, not merged."""
    base_dir, _ = unet(tmp_path)
    name = kohya_name("lora_unet", TO_Q)
    factors = {"lora_down.weight": torch.ones(2, 32, 1, 1), "lora_mid.weight": torch.ones(2, 2, 3, 3)}
    save_lycoris(tmp_path / "lyco.safetensors", {name: (factors | {"lora_up.weight": torch.ones(32, 2, 1, 1)}, 1.0)})
    message = refused(base_dir, tmp_path / "lyco.safetensors", tmp_path / "out", "Tucker LoCon ΔW is")
    assert name in message and "[32, 32, 3, 3]" in message, message
