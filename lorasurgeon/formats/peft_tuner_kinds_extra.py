"""The rest of PEFT 0.21's mergeable tuners, as in peft_tuner_kinds: BEFT, GLoRA, HiRA, DEFT, OSF,
Supertuning, PVeRA, UniLoRA, FRoD, PEANUT and TinyLoRA (each `parse` restates the tuner's `update_layer` /
`_create_and_replace`).
"""

from __future__ import annotations

from lorasurgeon.formats.peft_tuner_config import Parsed, Site, TunerKind

# transformers' ACT2FN names whose function torch has exactly (PEANUT's act_fn); others are refused.
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "gelu_pytorch_tanh", "relu6", "leaky_relu")


def _beft(s: Site) -> Parsed:
    return Parsed({}, writes=("bias",), needs=("bias",))  # beft/layer.py: PEFT refuses a base without a bias


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


def _supertuning(s: Site) -> Parsed:
    if "supertuning_indices" not in s.shapes:
        s.unsupported(
            "the adapter was saved without supertuning_indices (save_precomputed_indices false): PEFT re-selects "
            "them with torch.topk on the base weight, whose order of equal magnitudes lorasurgeon cannot promise"
        )
    rank = s.cfg.raw("r")
    hybrid = "supertuning_lora_A.weight" in s.shapes
    if hybrid != (rank is not None):
        s.mismatch(f"{'has' if hybrid else 'lacks'} LoRA factors, but adapter_config.json has r = {rank!r}")
    alpha = s.cfg.number("lora_alpha", 0.0) if hybrid else 0.0
    return Parsed({"lora_scaling": alpha / float(rank) if hybrid else 0.0})


def _pvera(s: Site) -> Parsed:
    if s.cfg.flag("sample_at_inference", False):
        s.unsupported("PVeRA samples its update at inference (sample_at_inference), and its merge keeps the mean only")
    if not s.cfg.flag("save_projection", True) or "pvera_A" not in s.shared:
        s.unsupported(
            "PVeRA was saved without its projections (save_projection false): PEFT regenerates them from "
            "projection_prng_key with torch's generator, whose stream lorasurgeon cannot promise to match"
        )
    rank = s.cfg.integer("r", 256)
    if s.shape("pvera_lambda_d") != (2 * rank,) or s.shared["pvera_A"][0] != 2 * rank:
        s.mismatch(f"has pvera_lambda_d {list(s.shape('pvera_lambda_d'))}, not the 2·r = {2 * rank} values")
    return Parsed({})


def _unilora(s: Site) -> Parsed:
    if "unilora_indices_A" not in s.shapes:
        s.unsupported(
            "the adapter was saved without its indices and scales (save_indices false): PEFT draws them again "
            "from proj_seed with torch's generator, whose stream lorasurgeon cannot promise to match"
        )
    return Parsed({})


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
    depth = s.cfg.integer("depth", 0)
    activation = s.cfg.choice("act_fn", "relu", ACTIVATIONS)
    for i in range(depth):
        s.shape(f"peanut_encoders.{i}.weight")
        s.shape(f"peanut_decoders.{i}.weight")
    if f"peanut_encoders.{depth}.weight" in s.shapes:
        s.mismatch(f"has more encoder layers than adapter_config.json's depth {depth}")
    return Parsed({"depth": depth, "activation": activation, "scaling": s.cfg.number("scaling", 1.0)})


def _tinylora(s: Site) -> Parsed:
    vectors = sorted(k for k in s.shared if k.startswith("tinylora_v."))
    if vectors != ["tinylora_v.0"]:
        s.unsupported(
            f"its modules share {len(vectors)} vectors tinylora_v.<i> in groups assigned by each module's position "
            "in the model's named_modules() order, which the adapter does not record (one vector for all, "
            "weight_tying 1, is read)"
        )
    if "tinylora_P" not in s.shapes:
        s.unsupported("the adapter was saved without tinylora_P (save_projection false), which PEFT draws again")
    return Parsed({"vector": vectors[0]})


TUNERS: dict[str, TunerKind] = {
    "BEFT": TunerKind(("beft_bias",), _beft),
    "GLORA": TunerKind(GLORA_ROLES, _glora, required=()),
    "HIRA": TunerKind(("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"), _hira, required=()),
    "DEFT": TunerKind(("deft_P", "deft_R"), _deft, required=("deft_P",)),
    "OSF": TunerKind(("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"), _osf),
    "SUPERTUNING": TunerKind(
        (
            "supertuning_values",
            "supertuning_indices",
            "supertuning_lora_A.weight",
            "supertuning_lora_B.weight",
        ),
        _supertuning,
        required=("supertuning_values",),
    ),
    "PVERA": TunerKind(("pvera_lambda_b", "pvera_lambda_d"), _pvera, shared=("pvera_A", "pvera_B")),
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
    "TINYLORA": TunerKind(
        ("tinylora_A", "tinylora_B", "tinylora_P"),
        _tinylora,
        shared=("tinylora_v",),
        shared_named=True,
        required=("tinylora_A", "tinylora_B"),
    ),
    "UNILORA": TunerKind(
        ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
        _unilora,
        shared=("unilora_theta_d",),
        required=(),
    ),
}
