"""The PEFT tuners whose new weight is a product with the base weight (rotations, scalings, projections), and
those whose files set base tensors outright, as a table in the form of formats.peft_tuner_additive: each
`parse` restates the tuner's `update_layer` / `_create_and_replace` of PEFT 0.21 (the maths is tuner_products').
"""

from __future__ import annotations

import math
import re

from lorasurgeon.formats.peft_tuner_config import Parsed, Site, TunerKind

# transformers' ACT2FN names whose function torch has exactly (PEANUT's act_fn); others are refused.
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "gelu_pytorch_tanh", "relu6", "leaky_relu")


def _ia3(s: Site) -> Parsed:
    ff = s.cfg.raw("feedforward_modules")
    if ff is None:
        s.unsupported("feedforward_modules is null, which PEFT fills from its per-architecture table")
    # Not dot-aligned: a plain endswith (ia3/model.py `_check_target_module_feedforward`).
    feedforward = bool(re.fullmatch(ff, s.module)) if isinstance(ff, str) else any(s.module.endswith(f) for f in ff)
    shape = s.shape("ia3_l")
    # (1, in) or (out, 1) for a Linear / Conv1D (before its transpose), (1, C, 1, ...) for a conv
    if len(shape) < 2 or (shape[0] if feedforward or len(shape) > 2 else shape[1]) != 1:
        s.mismatch(f"has ia3_l {list(shape)}, not the vector of a {'feedforward' if feedforward else 'output'} module")
    writes = ("weight",) if feedforward else ("weight", "bias")
    return Parsed({"feedforward": feedforward}, writes=writes)


def _oft(s: Site) -> Parsed:
    if "oft_block_size" not in s.cfg.data:
        s.unsupported("the config has no oft_block_size: an OFT adapter of PEFT <= 0.13, which PEFT 0.21 refuses")
    neumann = s.cfg.flag("use_cayley_neumann", True)
    version = str(s.cfg.raw("peft_version", "0.0.0")).partition("@")[0]
    if neumann and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 18):
        s.unsupported(f"uses the Cayley-Neumann series of PEFT {version}, which PEFT 0.18 changed")
    rows, n = s.shape(s.roles[0])
    block = round((1 + math.sqrt(1 + 8 * n)) / 2)
    if block * (block - 1) // 2 != n:
        s.mismatch(f"has oft_R.weight rows of {n} values, which is no block's upper triangle")
    return Parsed(
        {
            "block_size": block,
            "blocks": rows,
            "block_share": s.cfg.flag("block_share", False),
            "coft": s.cfg.flag("coft", False),
            "eps": s.cfg.number("eps", 6e-5),
            "neumann_terms": s.cfg.integer("num_cayley_neumann_terms", 5) if neumann else 0,
            "config_r": s.cfg.integer("r", 0, minimum=0),
            "config_block_size": s.cfg.integer("oft_block_size", 32, minimum=0),
            "embedding": s.roles[0] == "oft_embedding_R.weight",
        }
    )


def _boft(s: Site) -> Parsed:
    shape = s.shape("boft_R")
    if len(shape) != 4 or shape[2] != shape[3]:
        s.mismatch(f"has boft_R {list(shape)}, not (butterfly factors, blocks, size, size)")
    factors, blocks, size, _ = shape
    wanted = s.cfg.integer("boft_n_butterfly_factor", 1)
    if factors not in (1, wanted):
        s.mismatch(f"has {factors} butterfly factors but boft_n_butterfly_factor is {wanted}")
    return Parsed({"factors": factors, "blocks": blocks, "block_size": size})


def _hra(s: Site) -> Parsed:
    return Parsed({"apply_gs": s.cfg.flag("apply_GS", False)})


def _road(s: Site) -> Parsed:
    variant = s.cfg.choice("variant", "road_1", ("road_1", "road_2", "road_4"))
    return Parsed({"variant": variant, "group_size": s.cfg.integer("group_size", 64)}, writes=("weight", "bias"))


GLORA_PATHS = ("A", "B", "C", "D", "E")
GLORA_ROLES = tuple(f"glora_{p}.{t}" for p in GLORA_PATHS for t in ("Xd", "Xu", "X", "zeros"))


def _glora(s: Site) -> Parsed:
    """GLoRA (glora/layer.py `update_layer`): each path is a LoRA (Xd @ Xu), a vector or a scalar (X), or
    nothing (a zeros buffer, or no tensor at all for PEFT's scalar 0). C, D and E exist only with a base bias."""
    kinds = {}
    for path in GLORA_PATHS:
        roles = {t for t in ("Xd", "Xu", "X", "zeros") if f"glora_{path}.{t}" in s.shapes}
        if roles not in ({"Xd", "Xu"}, {"X"}, {"zeros"}, set()):
            s.mismatch(f"has glora_{path} tensors {sorted(roles)}, which are no GLoRA path")
        kinds[path] = "lora" if "Xd" in roles else "x" if "X" in roles else "none"
    biased = any(kinds[p] != "none" for p in ("C", "D", "E"))
    return Parsed({"paths": kinds}, writes=("weight", "bias") if biased else ("weight",))


def _hira(s: Site) -> Parsed:
    rank = s.cfg.pattern("rank_pattern", s.module, s.cfg.number("r", 32))
    a = "hira_embedding_A" if "hira_embedding_A" in s.shapes else "hira_A"
    s.shape(a.replace("_A", "_B"))  # the B of the same form must be there too
    if s.shape(a)[0] != rank:
        s.mismatch(f"has {a} {list(s.shape(a))} but adapter_config.json gives r = {rank:g}")
    return Parsed({"embedding": a == "hira_embedding_A"})


def _deft(s: Site) -> Parsed:
    method = s.cfg.choice("decomposition_method", "relu", ("relu", "qr"))
    para = s.cfg.flag("para", False)
    rank = s.shape("deft_P")[1]
    alpha = s.cfg.raw("alpha")
    if para == ("deft_R" in s.shapes):
        s.mismatch(f"{'has' if para else 'lacks'} deft_R, but adapter_config.json has para = {para}")
    # deft/layer.py update_layer: r is min(r, out); the scaling alpha / r, or 1 when alpha is unset or 0.
    return Parsed({"method": method, "para": para, "scaling": float(alpha) / rank if alpha else 1.0})


def _osf(s: Site) -> Parsed:
    (n,) = s.shape("osf_svd_params.S_low")
    u, v = s.shape("osf_svd_params.U_low"), s.shape("osf_svd_params.V_low")
    if u[1:] != (n,) or v[:1] != (n,):
        s.mismatch(f"has U_low {list(u)}, S_low [{n}] and V_low {list(v)}, which do not multiply")
    return Parsed({"low_rank": n})  # the top min(out, in) − n directions of W stay as they are


def frod_category(module: str) -> str:
    """The projection-sharing category of a module path (frod/model.py `_category_from_key`): its last two
    segments joined by "_" (the last alone after a layer index), BERT's attention.output.dense as
    "attention_output"."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    return (
        "attention_output" if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else category
    )


def _frod(s: Site) -> Parsed:
    category = frod_category(s.module)
    missing = [n for n in ("frod_V", "frod_s_indices", "frod_s_size") if f"{n}.{category}" not in s.shared]
    if missing or not s.cfg.flag("save_projection", True):
        s.unsupported(
            f"the adapter lacks {', '.join(f'{n}.{category}' for n in missing) or 'its projections'} "
            "(save_projection false): PEFT recomputes them from every base layer of the category"
        )
    (n,) = s.shape("frod_lambda_l")
    if s.shared[f"frod_V.{category}"] != (n, n):
        s.mismatch(f"has frod_lambda_l of {n} for a frod_V.{category} {list(s.shared[f'frod_V.{category}'])}")
    return Parsed({"category": category})


def _peanut(s: Site) -> Parsed:
    depth = s.cfg.integer("depth", 0, minimum=0)
    activation = s.cfg.choice("act_fn", "relu", ACTIVATIONS)
    for i in range(depth):
        s.shape(f"peanut_encoders.{i}.weight")
        s.shape(f"peanut_decoders.{i}.weight")
    if f"peanut_encoders.{depth}.weight" in s.shapes:
        s.mismatch(f"has more encoder layers than adapter_config.json's depth {depth}")
    return Parsed({"depth": depth, "activation": activation, "scaling": s.cfg.number("scaling", 1.0)})


TUNERS: dict[str, TunerKind] = {
    "IA3": TunerKind(("ia3_l",), _ia3),
    "OFT": TunerKind(("oft_R.weight", "oft_embedding_R.weight"), _oft, required=()),
    "BOFT": TunerKind(("boft_R", "boft_s"), _boft),
    "HRA": TunerKind(("hra_u",), _hra),
    "ROAD": TunerKind(("road_theta", "road_alpha"), _road),
    "GLORA": TunerKind(GLORA_ROLES, _glora, required=()),
    "HIRA": TunerKind(("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"), _hira, required=()),
    "DEFT": TunerKind(("deft_P", "deft_R"), _deft, required=("deft_P",)),
    "OSF": TunerKind(("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"), _osf),
    "FROD": TunerKind(
        ("frod_lambda_l", "frod_lambda_s_values"),
        _frod,
        shared=("frod_V", "frod_s_indices", "frod_s_size"),
        shared_named=True,
    ),
    "PEANUT": TunerKind(
        ("peanut_A.weight", "peanut_B.weight"),
        _peanut,
        numbered=(r"peanut_encoders\.\d+\.weight", r"peanut_decoders\.\d+\.weight"),
    ),
    # Files that set base tensors outright: LN tuning's retrained norms, trainable tokens' rows.
    "LN_TUNING": TunerKind(("ln_tuning_layers.weight", "ln_tuning_layers.bias"), required=(), form="replacement"),
    "TRAINABLE_TOKENS": TunerKind(("trainable_tokens_delta",), form="rows"),
}
