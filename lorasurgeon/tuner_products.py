"""The non-LoRA tuners whose new tensors are products with the base's (tuner_shapes.PRODUCTS), as a table:
tuner -> (merge, unmerge), each from a TunerModule, its base tensors and its fp32 tensors to the new base
tensors. The formulas are in rotations (orthogonal ones) and weight_products; this module only picks each
tuner's tensors and values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from lorasurgeon import rotations, weight_products
from lorasurgeon.adapter import Layer, TunerModule
from lorasurgeon.errors import UnsupportedError
from lorasurgeon.tuner_kinds import NOT_INVERTIBLE

Tensors = Mapping[str, torch.Tensor]

Step = Callable[[TunerModule, Tensors, Tensors, Layer], dict[str, torch.Tensor]]


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _ia3(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        vector = f["ia3_l"]
        if inverse and bool((vector == 0).any()):
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge IA3: its vector ia3_l has a zero entry, which erased that "
                "part of the weight"
            )
        w = b["weight"]
        scale = weight_products.ia3_vector(vector, w.shape, m.params["feedforward"], layer == "conv1d")
        out = {"weight": w / scale if inverse else w * scale}
        if not m.params["feedforward"] and "bias" in b:
            v = vector.reshape(b["bias"].shape)
            out["bias"] = b["bias"] / v if inverse else b["bias"] * v
        return out

    return step


def _oft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        p, w = m.params, b["weight"]
        vec = f["oft_embedding_R.weight"] if layer == "embedding" else f["oft_R.weight"]
        blocks = rotations.oft_blocks(vec, p["block_size"], p["coft"], p["eps"], p["neumann_terms"])
        fn = rotations.oft_unmerge if inverse else rotations.oft_merge
        if layer == "embedding":
            return {"weight": fn(w, blocks, True)}
        return {"weight": fn(_flat(w), blocks, False).reshape(w.shape)}

    return step


def _boft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w, scale = b["weight"], f["boft_s"]
        if inverse and bool((scale == 0).any()):
            raise UnsupportedError(f"module {m.module}: cannot unmerge BOFT: its scale boft_s has a zero entry")
        flat = _flat(w)
        rotation = rotations.boft_rotation(f["boft_R"], flat.shape[1])
        fn = rotations.boft_unmerge if inverse else rotations.boft_merge
        return {"weight": fn(flat, rotation, scale).reshape(w.shape)}

    return step


def _hra(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w = b["weight"]
        new = rotations.hra_merge(_flat(w), f["hra_u"], m.params["apply_gs"], reverse=inverse)
        return {"weight": new.reshape(w.shape)}

    return step


def _road(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        group = m.params["group_size"]
        first, second = rotations.road_columns(m.params["variant"], group, f["road_theta"], f["road_alpha"])
        if inverse and bool((rotations.road_determinants(first, second, group) == 0).any()):
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge RoAd: a pair of its outputs is scaled to zero (road_alpha 0)"
            )
        fn = rotations.road_unmerge if inverse else rotations.road_merge
        return {k: fn(v, first, second, group) for k, v in b.items() if k in ("weight", "bias")}

    return step


def _miss_bat(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        return {"weight": weight_products.miss_bat_merge(b["weight"], f["miss_block"], reverse=inverse)}

    return step


def _beft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        offset = f["beft_bias"].reshape(b["bias"].shape)  # beft/layer.py merge: bias + beft_bias.squeeze()
        return {"bias": b["bias"] - offset if inverse else b["bias"] + offset}

    return step


def _hira(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        w = b["weight"]
        if m.params["embedding"]:  # hira/layer.py Embedding.get_delta_weight: (B A)ᵀ, (num_embeddings, dim)
            delta = (f["hira_embedding_B"] @ f["hira_embedding_A"]).T
        else:  # Linear: B A (transposed for Conv1D); conv: B (out, r, 1, …) A (r, in, *k) over r
            a, bb = f["hira_A"], f["hira_B"]
            delta = (bb.reshape(bb.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(
                w.shape if w.dim() > 2 else (bb.shape[0], -1)
            )
            delta = delta.T if layer == "conv1d" else delta
        if inverse and bool((delta == -1).any()):
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge HiRA: 1 + B A has a zero entry, which erased W there"
            )
        return {"weight": weight_products.hira_merge(w, delta, reverse=inverse)}

    return step


def _glora(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        paths: dict[str, torch.Tensor | float] = {}
        for p, kind in m.params["paths"].items():
            name = f"glora_{p}"
            paths[p] = f[f"{name}.Xd"] @ f[f"{name}.Xu"] if kind == "lora" else f[f"{name}.X"] if kind == "x" else 0.0
        if inverse and any(isinstance(t, torch.Tensor) and bool((t == -1).any()) for t in (paths["A"], paths["D"])):
            raise UnsupportedError(f"module {m.module}: cannot unmerge GLoRA: 1 + A or 1 + D has a zero entry")
        w, bias = weight_products.glora_merge(b["weight"], b.get("bias"), paths, reverse=inverse)
        return {"weight": w} if bias is None or "bias" not in m.writes else {"weight": w, "bias": bias}

    return step


def _deft(inverse: bool) -> Step:
    def step(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
        p = m.params
        if inverse and p["method"] == "qr":
            raise UnsupportedError(
                f"module {m.module}: cannot unmerge DEFT with decomposition_method qr: it projects r directions out "
                "of W, and the adapter does not hold them"
            )
        q, g = weight_products.deft_projection(f["deft_P"], p["method"])
        w = b["weight"].T if layer == "conv1d" else b["weight"]
        fn = weight_products.deft_unmerge if inverse else weight_products.deft_merge
        new = fn(w, q, g, f.get("deft_R"), p["scaling"])
        return {"weight": new.T if layer == "conv1d" else new}

    return step


def _osf(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    u, s, v = (f[f"osf_svd_params.{x}"] for x in ("U_low", "S_low", "V_low"))
    return {"weight": weight_products.osf_merge(b["weight"], u, s, v)}


def _frod(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    cat = m.params["category"]
    w = b["weight"].T if layer == "conv1d" else b["weight"]
    size = tuple(int(x) for x in f[f"frod_s_size.{cat}"].tolist())
    new = weight_products.frod_merge(
        w,
        f[f"frod_V.{cat}"],
        f[f"frod_s_indices.{cat}"],
        size,
        f["frod_lambda_s_values"],
        f["frod_lambda_l"],
    )
    return {"weight": new.T if layer == "conv1d" else new}


def _peanut(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    p = m.params
    encoders = [f[f"peanut_encoders.{i}.weight"] for i in range(p["depth"])]
    decoders = [f[f"peanut_decoders.{i}.weight"] for i in range(p["depth"])]
    w = b["weight"]
    d = weight_products.peanut_delta(
        w, f["peanut_A.weight"], f["peanut_B.weight"], encoders, decoders, p["activation"], p["scaling"]
    )
    return {"weight": w + d}


def _refused(m: TunerModule, b: Tensors, f: Tensors, layer: Layer) -> dict[str, torch.Tensor]:
    raise UnsupportedError(f"module {m.module}: cannot unmerge {m.tuner}: {NOT_INVERTIBLE[m.tuner]}")


MULTIPLICATIVE: dict[str, tuple[Step, Step]] = {
    "IA3": (_ia3(False), _ia3(True)),
    "OFT": (_oft(False), _oft(True)),
    "BOFT": (_boft(False), _boft(True)),
    "HRA": (_hra(False), _hra(True)),
    "ROAD": (_road(False), _road(True)),
    "MISS": (_miss_bat(False), _miss_bat(True)),
    "BEFT": (_beft(False), _beft(True)),
    "HIRA": (_hira(False), _hira(True)),
    "GLORA": (_glora(False), _glora(True)),
    "DEFT": (_deft(False), _deft(True)),
    "OSF": (_osf, _refused),
    "FROD": (_frod, _refused),
    "PEANUT": (_peanut, _refused),
}
