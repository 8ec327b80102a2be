"""The PEFT tuners whose update is added to the weight and does not depend on it, as a table: how each is stored
and what PEFT derives from its config per module.

`TUNERS` maps each peft_type to its `TunerKind`: the per-module tensor roles (the names PEFT saves after the
module path, adapter name removed), the adapter-wide tensors saved under `base_model.`, and `parse`, which turns
the config and a module's tensor shapes into the values the maths (tuner_deltas) needs, exactly as the tuner's
`model.py` `_create_and_replace` and `layer.py` `update_layer` do in PEFT 0.21.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorasurgeon import lycoris
from lorasurgeon.formats.peft_tuner_config import Parsed, Site, TunerKind


def _adalora(s: Site) -> Parsed:
    a, b, e = s.shape("lora_A"), s.shape("lora_B"), s.shape("lora_E")
    rank = a[0]
    if e != (rank, 1) or len(b) != 2 or b[1] != rank:
        s.mismatch(f"has lora_A {list(a)}, lora_B {list(b)} and lora_E {list(e)}, which do not fit together")
    init_r = s.cfg.integer("init_r", 12)
    budget = {k.split(".lora_E")[0]: v for k, v in s.cfg.mapping("rank_pattern").items()}
    kept = budget.get(s.module)
    if kept is not None and not isinstance(kept, list):
        s.unsupported(f"rank_pattern gives {kept!r}, not AdaLoRA's list of kept singular values (true/false)")
    loaded = init_r if kept is None else sum(bool(x) for x in kept)
    if rank != loaded:
        s.mismatch(f"has rank {rank} but adapter_config.json's init_r / rank_pattern give {loaded}")
    alpha = s.cfg.number("lora_alpha", 8)
    # adalora/layer.py update_layer: scaling is lora_alpha, or the rank when alpha is 0; ranknum stays init_r
    # (model.py resize_modules_by_rank_pattern copies the old ranknum back), and the delta divides by it + 1e-5.
    return Parsed({"scaling": alpha if alpha > 0 else float(rank), "ranknum": float(init_r), "rank": rank})


def _lycoris_like(kind: str) -> Callable[[Site], Parsed]:
    def parse(s: Site) -> Parsed:
        shapes = {role: s.shape(role) for role in s.roles}
        layout = lycoris.layout(kind, shapes)
        if layout.problem:
            s.mismatch(layout.problem)
        rank = s.cfg.pattern("rank_pattern", s.module, s.cfg.number("r", 8))
        alpha = s.cfg.pattern("alpha_pattern", s.module, s.cfg.number("alpha", 8))
        if layout.rank is not None and layout.rank != rank:
            s.mismatch(f"has rank {layout.rank} but adapter_config.json gives r = {rank:g}")
        # PEFT scales LoHa and LoKr by alpha / r always, also a LoKr with two full matrices (lycoris_utils.py
        # and lokr/layer.py update_layer), where LyCORIS itself uses 1.
        return Parsed({"scale": alpha / rank, "shape": layout.shape, "rank": int(rank)})

    return parse


def _saved_projection(s: Site, name: str, role: str, what: str = "its projections") -> None:
    """Refuse a VeRA-like adapter saved without its random matrices, which PEFT draws again at load time."""
    if not s.cfg.flag("save_projection", True) or role not in s.shared:
        s.unsupported(
            f"{name} was saved without {what} (save_projection false): PEFT regenerates them from "
            "projection_prng_key with torch's generator, whose stream lorasurgeon cannot promise to match"
        )


def _vera(s: Site) -> Parsed:
    _saved_projection(s, "VeRA", "vera_A")
    rank, (d,), (b_len,) = s.cfg.integer("r", 256), s.shape("vera_lambda_d"), s.shape("vera_lambda_b")
    if d != rank or s.shared["vera_A"][0] != rank or s.shared["vera_B"][1] != rank:
        s.mismatch(f"has vera_lambda_d of {d}, but r is {rank} and vera_A is {list(s.shared['vera_A'])}")
    return Parsed({"out": b_len, "rank": rank})


def _pvera(s: Site) -> Parsed:
    if s.cfg.flag("sample_at_inference", False):
        s.unsupported("PVeRA samples its update at inference (sample_at_inference), and its merge keeps the mean only")
    _saved_projection(s, "PVeRA", "pvera_A")
    rank = s.cfg.integer("r", 256)
    if s.shape("pvera_lambda_d") != (2 * rank,) or s.shared["pvera_A"][0] != 2 * rank:
        s.mismatch(f"has pvera_lambda_d {list(s.shape('pvera_lambda_d'))}, not the 2·r = {2 * rank} values")
    return Parsed({})


def _randlora(s: Site) -> Parsed:
    _saved_projection(s, "RandLoRA", "randlora_A", "its random bases")
    rank = s.cfg.integer("r", 32)
    if s.shape("randlora_lambda")[0] != rank:
        s.mismatch(f"has randlora_lambda {list(s.shape('randlora_lambda'))} but r is {rank}")
    return Parsed({"scaling": s.cfg.number("randlora_alpha", 640) / rank, "rank": rank})


def _spectrum(dotted: bool, default_n: int) -> Callable[[Site], Parsed]:
    """FourierFT and WaveFT: n coefficients at positions PEFT draws with torch.randperm from random_loc_seed."""

    def parse(s: Site) -> Parsed:
        role = s.roles[0]
        (n,) = s.shape(role)
        if not s.cfg.flag("proportional_parameters", False):
            wanted = s.cfg.pattern(
                "n_frequency_pattern", s.module, s.cfg.number("n_frequency", default_n), dotted=dotted
            )
            if n != wanted:
                s.mismatch(f"has {n} spectrum values but adapter_config.json gives n_frequency {wanted:g}")
        params: dict[str, Any] = {
            "n": n,
            "scaling": s.cfg.number("scaling", 150.0 if role.startswith("fourier") else 25.0),
            "seed": s.cfg.integer("random_loc_seed", 777, minimum=0),
        }
        if role.startswith("waveft"):
            params["wavelet"] = str(s.cfg.raw("wavelet_family", "db1"))
            params["idwt"] = s.cfg.flag("use_idwt", True)
            if params["idwt"] and params["wavelet"] not in ("db1", "haar"):
                s.unsupported(f"uses wavelet_family {params['wavelet']!r}; lorasurgeon inverts db1 (Haar) only")
        return Parsed(params)

    return parse


def _miss(s: Site) -> Parsed:
    init = s.cfg.raw("init_weights", True)
    kind = "bat" if init == "bat" else "mini" if init == "mini" else "miss"
    shape = s.shape("miss_block")
    if (kind == "bat") != (len(shape) == 3):
        s.mismatch(f"has miss_block {list(shape)}, which is not MiSS init_weights={init!r}'s shape")
    return Parsed({"kind": kind, "mini_r": s.cfg.integer("mini_r", 1)})


def _shira(s: Site) -> Parsed:
    (n,), idx = s.shape("shira_weight"), s.shape("shira_indices")
    if idx != (2, n):
        s.mismatch(f"has shira_indices {list(idx)} for {n} shira_weight values")
    return Parsed({"scaling": 1.0})  # ShiraLayer.update_layer: 1.0, not saved


def _c3a(s: Site) -> Parsed:
    shape = s.shape("c3a_kernel")
    wanted = s.cfg.pattern("block_size_pattern", s.module, s.cfg.number("block_size", 256), dotted=True)
    if len(shape) != 3 or shape[2] != wanted:
        s.mismatch(f"has c3a_kernel {list(shape)} but adapter_config.json gives block_size {wanted:g}")
    return Parsed({})


def _delora(s: Site) -> Parsed:
    rank = s.cfg.pattern("rank_pattern", s.module, s.cfg.number("r", 8))
    if s.shape("delora_A")[0] != rank:
        s.mismatch(f"has delora_A {list(s.shape('delora_A'))} but adapter_config.json gives r = {rank:g}")
    return Parsed({"r": rank, "rank": int(rank)})


def _gralora(s: Site) -> Parsed:
    k, _, rank = s.shape("gralora_A")
    hybrid = s.shape("gralora_A_general.weight")[0] if "gralora_A_general.weight" in s.roles else 0
    if k != s.cfg.integer("gralora_k", 2) or rank != s.cfg.integer("r", 32) or rank % k:
        s.mismatch(f"has gralora_A {list(s.shape('gralora_A'))}, which gralora_k and r do not give")
    if hybrid != s.cfg.integer("hybrid_r", 0, minimum=0):
        s.mismatch(f"has a hybrid part of rank {hybrid} but hybrid_r is {s.cfg.raw('hybrid_r', 0)}")
    return Parsed({"k": k, "scaling": s.cfg.number("alpha", 64) / (rank + hybrid)})


def _vblora(s: Site) -> Parsed:
    topk = s.cfg.integer("topk", 2)
    for half in ("A", "B"):
        logits = f"vblora_logits_{half}"
        saved = (f"{logits}_topk_indices", f"{logits}_topk_weights")
        if logits in s.shapes:
            continue
        if not all(r in s.shapes for r in saved):
            s.mismatch(f"lacks {logits} (or its {saved[0]} and {saved[1]})")
        if s.shape(saved[0])[-1] != topk or s.shape(saved[1])[-1] != topk - 1:
            s.mismatch(f"has {saved[0]} {list(s.shape(saved[0]))}, which does not keep topk = {topk} vectors")
    return Parsed({"topk": topk})


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


def _unilora(s: Site) -> Parsed:
    if "unilora_indices_A" not in s.shapes:
        s.unsupported(
            "the adapter was saved without its indices and scales (save_indices false): PEFT draws them again "
            "from proj_seed with torch's generator, whose stream lorasurgeon cannot promise to match"
        )
    return Parsed({})


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


def _beft(s: Site) -> Parsed:
    return Parsed({}, writes=("bias",), needs=("bias",))  # beft/layer.py: PEFT refuses a base without a bias


TUNERS: dict[str, TunerKind] = {
    "ADALORA": TunerKind(("lora_A", "lora_B", "lora_E"), _adalora),
    "LOHA": TunerKind(
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        _lycoris_like("loha"),
        required=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    ),
    "LOKR": TunerKind(
        ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        _lycoris_like("lokr"),
        required=(),
    ),
    "VERA": TunerKind(("vera_lambda_b", "vera_lambda_d"), _vera, shared=("vera_A", "vera_B")),
    "PVERA": TunerKind(("pvera_lambda_b", "pvera_lambda_d"), _pvera, shared=("pvera_A", "pvera_B")),
    "RANDLORA": TunerKind(
        ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
        _randlora,
        shared=("randlora_A", "randlora_B"),
        required=("randlora_lambda", "randlora_gamma"),
    ),
    "FOURIERFT": TunerKind(("fourierft_spectrum",), _spectrum(dotted=True, default_n=1000)),
    "WAVEFT": TunerKind(("waveft_spectrum",), _spectrum(dotted=False, default_n=2592)),
    "MISS": TunerKind(("miss_block",), _miss),
    "SHIRA": TunerKind(("shira_weight", "shira_indices"), _shira),
    "C3A": TunerKind(("c3a_kernel",), _c3a),
    "DELORA": TunerKind(("delora_A", "delora_B", "delora_lambda", "delora_w_norm"), _delora),
    "GRALORA": TunerKind(
        ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"),
        _gralora,
        required=("gralora_A", "gralora_B"),
    ),
    "VBLORA": TunerKind(
        (
            "vblora_logits_A",
            "vblora_logits_B",
            "vblora_logits_A_topk_indices",
            "vblora_logits_A_topk_weights",
            "vblora_logits_B_topk_indices",
            "vblora_logits_B_topk_weights",
        ),
        _vblora,
        shared=("vblora_vector_bank",),
        required=(),
    ),
    "SUPERTUNING": TunerKind(
        ("supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight"),
        _supertuning,
        required=("supertuning_values",),
    ),
    "UNILORA": TunerKind(
        ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
        _unilora,
        shared=("unilora_theta_d",),
        required=(),
    ),
    "TINYLORA": TunerKind(
        ("tinylora_A", "tinylora_B", "tinylora_P"),
        _tinylora,
        shared=("tinylora_v",),
        shared_named=True,
        required=("tinylora_A", "tinylora_B"),
    ),
    "BEFT": TunerKind(("beft_bias",), _beft),
}
