"""Whether a non-LoRA tuner module fits its base tensors, from shapes alone (headers: `check`, `--dry-run`).

Each check returns a clause completing "module X …" (e.g. "has ia3_l [1, 48] for a weight of 64 columns"),
or None when the module fits. The layers each tuner adapts are those PEFT 0.21's `_create_new_module`
dispatches to (and OFT only on 1×1 convs: on a k×k conv PEFT's merge is not its forward, see LAYERS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from lorasurgeon import lycoris
from lorasurgeon.adapter import Layer, TunerModule

Shape = tuple[int, ...]
Shapes = Mapping[str, Shape]

LAYERS: dict[str, frozenset[str]] = {
    "IA3": frozenset({"linear", "conv1d", "conv"}),
    "ADALORA": frozenset({"linear", "conv1d", "conv"}),
    "LOHA": frozenset({"linear", "conv"}),
    "LOKR": frozenset({"linear", "conv"}),
    "OFT": frozenset({"linear", "conv", "embedding"}),
    "BOFT": frozenset({"linear", "conv"}),
    "HRA": frozenset({"linear", "conv"}),
    "HIRA": frozenset({"linear", "conv1d", "conv", "embedding"}),
    **{t: frozenset({"linear"}) for t in ("MISS", "SHIRA", "C3A", "ROAD", "DELORA", "BEFT", "GLORA", "OSF", "PEANUT")},
    "SUPERTUNING": frozenset({"linear"}),
}
# VeRA, FourierFT, WaveFT, RandLoRA, GraLoRA, VB-LoRA, DEFT, PVeRA, UniLoRA, FRoD
DEFAULT_LAYERS = frozenset({"linear", "conv1d"})


def check(module: TunerModule, base: Shapes, factors: Shapes, layer: Layer) -> str | None:
    """A clause saying why the module does not fit base tensors of these shapes ("has ia3_l [1, 48] ..."),
    or None when it fits. `factors` holds the module's and the shared tensors' shapes by role."""
    return layer_problem(module, base, layer) or fit_problem(module, base, factors, layer)


def layer_problem(module: TunerModule, base: Shapes, layer: Layer) -> str | None:
    """Why the module cannot apply to a base layer of kind `layer` with these tensors, or None."""
    layers = LAYERS.get(module.tuner, DEFAULT_LAYERS)
    if layer not in layers:
        return f"is a {module.tuner} module on a {layer} layer, which PEFT's {module.tuner} does not adapt"
    missing = [p for p in module.needs if p not in base]
    if missing:
        return f"needs the base tensor {', '.join(module.target(p) for p in missing)}, which the base lacks"
    if module.tuner == "OFT" and ("oft_embedding_R.weight" in module.factors) != (layer == "embedding"):
        return f"holds OFT {'embedding ' if layer != 'embedding' else ''}rotations for a {layer} layer"
    w = base.get("weight")
    if layer == "conv" and w is not None and module.tuner in ("OFT", "BOFT", "HRA"):
        if len(w) != 4 or w[2] != w[3]:
            return f"is a {module.tuner} module on a kernel {list(w)}; PEFT rotates square 2-D kernels only"
        if module.tuner == "OFT" and w[2] != 1:
            return (
                f"is an OFT module on a {w[2]}x{w[3]} conv, where PEFT's merge differs from its forward (which "
                "rotates unfolded patches and folds them back); only 1x1 convs merge exactly"
            )
    return None


def fit_problem(module: TunerModule, base: Shapes, factors: Shapes, layer: Layer) -> str | None:
    """Why the module's tensors (and shared ones) do not fit base tensors of these shapes, or None."""
    w = base.get("weight")
    if w is None:
        return None
    out, inner = (w[1], w[0]) if layer == "conv1d" else (w[0], math.prod(w[1:]))
    check = FITS.get(module.tuner)
    problem = check(module, factors, out, inner, w) if check else None
    if problem is None and "bias" in base and "bias" in module.writes and base["bias"] != (out,):
        return f"has a bias {list(base['bias'])} for a weight of {out} outputs"
    return problem


def _has(factors: Shapes, role: str, want: Shape) -> str | None:
    got = factors.get(role)
    return None if got == want else f"has {role} {list(got or ())} where the base weight needs {list(want)}"


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _ia3(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    v = f["ia3_l"]
    if len(w) > 2:
        size = v[1] if len(v) > 1 else 0
        ok = size % w[1] == 0 if m.params["feedforward"] else size == out
        return None if ok else f"has ia3_l {list(v)} for a kernel {list(w)}"
    want = (1, inner) if m.params["feedforward"] else (out, 1)
    return _has(f, "ia3_l", want)


def _oft(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    p, dim = m.params, inner  # an Embedding's rotated features are its columns too
    size = p["block_size"]
    wanted = oft_block_size(dim, p["config_r"], p["config_block_size"])
    if size != wanted:
        return f"has OFT blocks of {size} where PEFT derives {wanted} for {dim} features from r / oft_block_size"
    blocks = 1 if p["block_share"] else dim // size
    role = "oft_embedding_R.weight" if "oft_embedding_R.weight" in f else "oft_R.weight"
    return _has(f, role, (blocks, size * (size - 1) // 2))


def oft_block_size(dim: int, r: int, block_size: int) -> int:
    """The block size PEFT's OFT uses for `dim` features (oft/layer.py `update_layer`, `adjust_oft_parameters`):
    the configured one if it divides `dim`, else the nearest divisor (ties: the smaller), or dim / r."""
    if r == 0:
        return block_size if dim % block_size == 0 and block_size <= dim else _nearest_divisor(dim, block_size)
    return dim // (r if dim % r == 0 and r <= dim else _nearest_divisor(dim, r))


def _nearest_divisor(dim: int, value: int) -> int:
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher:
        higher += 1
    lower = value
    while lower > 1 and dim % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def _boft(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    factors, blocks, size, _ = f["boft_R"]
    if blocks * size != inner:
        return f"has boft_R {list(f['boft_R'])}: {blocks} blocks of {size} for {inner} input features"
    if factors > 1 and (blocks % 2 ** (factors - 1) or size % 2):
        return f"has boft_R {list(f['boft_R'])}, which no butterfly of {factors} factors fits"
    return _has(f, "boft_s", (1, out) if len(w) > 2 else (out, 1))


def _road(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    group = m.params["group_size"]
    if group % 2 or out % group:
        return f"has RoAd group_size {group}, which does not split {out} outputs into even groups"
    size = {"road_1": out // 2, "road_2": out, "road_4": 2 * out}[m.params["variant"]]
    return _first(_has(f, "road_theta", (size,)), _has(f, "road_alpha", (size,)))


def _miss(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    block, kind = f["miss_block"], m.params["kind"]
    if kind == "bat":
        r = block[-1]
        ok = out % r == 0 and inner % r == 0 and block == (out // r, r, r)
    elif kind == "mini":
        ok = out % m.params["mini_r"] == 0 and block[1:] == (m.params["mini_r"],) and block[0] <= inner
    else:
        ok = len(block) == 2 and block[1] == out and block[0] <= inner
    return None if ok else f"has miss_block {list(block)} for a weight {out}x{inner} (init {kind!r})"


def _randlora(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    rank, n = f["randlora_lambda"]
    small, large = min(out, inner), max(out, inner)
    a, b = f["randlora_A"], f["randlora_B"]
    if n != math.ceil(small / rank) or f["randlora_gamma"] != (n, small):
        return f"has randlora_lambda {[rank, n]} and randlora_gamma {list(f['randlora_gamma'])} for {out}x{inner}"
    if a[0] != rank or a[2] < small or b[0] < large or b[1] < n or b[2] != rank:
        return f"has shared bases randlora_A {list(a)} / randlora_B {list(b)} too small for {out}x{inner}"
    return None


def _vblora(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    length = f["vblora_vector_bank"][1]
    a = f.get("vblora_logits_A", f.get("vblora_logits_A_topk_indices", ()))
    b = f.get("vblora_logits_B", f.get("vblora_logits_B_topk_indices", ()))
    if inner % length or out % length or a[1:2] != (inner // length,) or b[:1] != (out // length,):
        return f"has logits {list(a)} / {list(b)} and vectors of {length}, which do not tile {out}x{inner}"
    return None


def _gralora(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    k, sub_in, rank = f["gralora_A"]
    hybrid = f.get("gralora_A_general.weight", (0,))[0]
    return _first(
        None if k * sub_in == inner else f"has gralora_A {list(f['gralora_A'])} for {inner} inputs",
        _has(f, "gralora_B", (k, rank, out // k)) if out % k == 0 else f"has {out} outputs, not a multiple of {k}",
        _has(f, "gralora_A_general.weight", (hybrid, inner)) if hybrid else None,
        _has(f, "gralora_B_general.weight", (out, hybrid)) if hybrid else None,
    )


def _lycoris(m: TunerModule, f: Shapes, out: int, inner: int, w: Shape) -> str | None:
    shape = m.params["shape"]
    return None if lycoris.fits(shape, w) else f"gives a ΔW of {list(shape)} for a base weight {list(w)}"


Check = Callable[[TunerModule, Shapes, int, int, Shape], "str | None"]
FITS: dict[str, Check] = {
    "IA3": _ia3,
    "ADALORA": lambda m, f, o, i, w: _first(
        _has(f, "lora_A", (f["lora_A"][0], i)), _has(f, "lora_B", (o, f["lora_A"][0]))
    ),
    "LOHA": _lycoris,
    "LOKR": _lycoris,
    "VERA": lambda m, f, o, i, w: (
        _has(f, "vera_lambda_b", (o,))
        or (
            None if f["vera_A"][1] >= i and f["vera_B"][0] >= o else "has shared vera_A / vera_B smaller than the layer"
        )
    ),
    "OFT": _oft,
    "BOFT": _boft,
    "FOURIERFT": lambda m, f, o, i, w: None if m.params["n"] <= o * i else f"has more coefficients than {o}x{i}",
    "WAVEFT": lambda m, f, o, i, w: None if m.params["n"] <= o * i else f"has more coefficients than {o}x{i}",
    "MISS": _miss,
    "HRA": lambda m, f, o, i, w: None if f["hra_u"][0] == i else f"has hra_u {list(f['hra_u'])} for {i} inputs",
    "RANDLORA": _randlora,
    "C3A": lambda m, f, o, i, w: (
        None
        if f["c3a_kernel"][0] * f["c3a_kernel"][2] == o and f["c3a_kernel"][1] * f["c3a_kernel"][2] == i
        else f"has c3a_kernel {list(f['c3a_kernel'])} for a weight {o}x{i}"
    ),
    "ROAD": _road,
    "DELORA": lambda m, f, o, i, w: _first(
        _has(f, "delora_A", (f["delora_A"][0], i)),
        _has(f, "delora_B", (o, f["delora_A"][0])),
        _has(f, "delora_w_norm", (i,)),
    ),
    "GRALORA": _gralora,
    "VBLORA": _vblora,
}
