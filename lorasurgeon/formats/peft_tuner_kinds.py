"""Every PEFT tuner but LoRA, as a table: how each is stored and what PEFT derives from its config per module.

`TUNERS` maps each of the tuners here (the twenty of PEFT 0.21 lorasurgeon read first; the rest are in
peft_tuner_kinds_extra) to its `TunerKind`: the per-module tensor roles (the names PEFT saves after the module
path, adapter name removed), the adapter-wide tensors saved under `base_model.`, and `parse`, which turns the
config and a module's tensor shapes into the values the maths needs, exactly as the tuner's `model.py`
`_create_and_replace` and `layer.py` `update_layer` do in PEFT 0.21.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from lorasurgeon import lycoris
from lorasurgeon.formats.peft_tuner_config import Parsed, PatternRule, Site, TunerKind


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
    return Parsed({"scaling": alpha if alpha > 0 else float(rank), "ranknum": float(init_r)})


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
        return Parsed({"scale": alpha / rank, "shape": layout.shape})

    return parse


def _vera(s: Site) -> Parsed:
    if not s.cfg.flag("save_projection", True) or "vera_A" not in s.shared:
        s.unsupported(
            "VeRA was saved without its projections (save_projection false): PEFT regenerates vera_A / vera_B "
            "from projection_prng_key with torch's generator, whose stream lorasurgeon cannot promise to match"
        )
    rank, (d,), (b_len,) = s.cfg.integer("r", 256), s.shape("vera_lambda_d"), s.shape("vera_lambda_b")
    if d != rank or s.shared["vera_A"][0] != rank or s.shared["vera_B"][1] != rank:
        s.mismatch(f"has vera_lambda_d of {d}, but r is {rank} and vera_A is {list(s.shared['vera_A'])}")
    return Parsed({"out": b_len})


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
            "config_r": s.cfg.integer("r", 0),
            "config_block_size": s.cfg.integer("oft_block_size", 32),
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


def _fourier(field_name: str, pattern_rule: PatternRule, default_n: int) -> Callable[[Site], Parsed]:
    def parse(s: Site) -> Parsed:
        role = s.roles[0]
        (n,) = s.shape(role)
        if not s.cfg.flag("proportional_parameters", False):
            wanted = s.cfg.pattern(field_name, s.module, s.cfg.number("n_frequency", default_n), pattern_rule)
            if n != wanted:
                s.mismatch(f"has {n} spectrum values but adapter_config.json gives n_frequency {wanted:g}")
        params: dict[str, Any] = {
            "n": n,
            "scaling": s.cfg.number("scaling", 150.0 if role.startswith("fourier") else 25.0),
            "seed": s.cfg.integer("random_loc_seed", 777),
        }
        if role.startswith("waveft"):
            params["wavelet"] = str(s.cfg.raw("wavelet_family", "db1"))
            params["idwt"] = s.cfg.flag("use_idwt", True)
            if params["idwt"] and params["wavelet"] not in ("db1", "haar"):
                s.unsupported(f"uses wavelet_family {params['wavelet']!r}; lorasurgeon inverts db1 (Haar) only")
        return Parsed(params)

    return parse


def _ln_tuning(s: Site) -> Parsed:
    return Parsed({}, writes=tuple(r.split(".", 1)[1] for r in s.roles), needs=())


def _miss(s: Site) -> Parsed:
    init = s.cfg.raw("init_weights", True)
    kind = "bat" if init == "bat" else "mini" if init == "mini" else "miss"
    shape = s.shape("miss_block")
    if (kind == "bat") != (len(shape) == 3):
        s.mismatch(f"has miss_block {list(shape)}, which is not MiSS init_weights={init!r}'s shape")
    return Parsed({"kind": kind, "mini_r": s.cfg.integer("mini_r", 1)})


def _hra(s: Site) -> Parsed:
    return Parsed({"apply_gs": s.cfg.flag("apply_GS", False)})


def _randlora(s: Site) -> Parsed:
    if not s.cfg.flag("save_projection", True) or "randlora_A" not in s.shared:
        s.unsupported(
            "RandLoRA was saved without its random bases (save_projection false): PEFT regenerates them from "
            "projection_prng_key with torch's generator, whose stream lorasurgeon cannot promise to match"
        )
    rank = s.cfg.integer("r", 32)
    if s.shape("randlora_lambda")[0] != rank:
        s.mismatch(f"has randlora_lambda {list(s.shape('randlora_lambda'))} but r is {rank}")
    return Parsed({"scaling": s.cfg.number("randlora_alpha", 640) / rank})


def _shira(s: Site) -> Parsed:
    (n,), idx = s.shape("shira_weight"), s.shape("shira_indices")
    if idx != (2, n):
        s.mismatch(f"has shira_indices {list(idx)} for {n} shira_weight values")
    return Parsed({"scaling": 1.0})  # ShiraLayer.update_layer: 1.0, not saved


def _c3a(s: Site) -> Parsed:
    shape = s.shape("c3a_kernel")
    wanted = s.cfg.pattern("block_size_pattern", s.module, s.cfg.number("block_size", 256), "dotted")
    if len(shape) != 3 or shape[2] != wanted:
        s.mismatch(f"has c3a_kernel {list(shape)} but adapter_config.json gives block_size {wanted:g}")
    return Parsed({})


def _road(s: Site) -> Parsed:
    variant = s.cfg.choice("variant", "road_1", ("road_1", "road_2", "road_4"))
    return Parsed({"variant": variant, "group_size": s.cfg.integer("group_size", 64)}, writes=("weight", "bias"))


def _delora(s: Site) -> Parsed:
    rank = s.cfg.pattern("rank_pattern", s.module, s.cfg.number("r", 8))
    if s.shape("delora_A")[0] != rank:
        s.mismatch(f"has delora_A {list(s.shape('delora_A'))} but adapter_config.json gives r = {rank:g}")
    return Parsed({"r": rank})


def _gralora(s: Site) -> Parsed:
    k, _, rank = s.shape("gralora_A")
    hybrid = s.shape("gralora_A_general.weight")[0] if "gralora_A_general.weight" in s.roles else 0
    if k != s.cfg.integer("gralora_k", 2) or rank != s.cfg.integer("r", 32) or rank % k:
        s.mismatch(f"has gralora_A {list(s.shape('gralora_A'))}, which gralora_k and r do not give")
    if hybrid != s.cfg.integer("hybrid_r", 0):
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


def _trainable_tokens(s: Site) -> Parsed:
    indices = s.cfg.raw("token_indices", [])
    if (
        not isinstance(indices, list)
        or not all(isinstance(i, int) for i in indices)
        or len(set(indices)) < len(indices)
    ):
        s.unsupported(f"token_indices is {indices!r}; lorasurgeon reads a list of distinct integers")
    if s.shape("trainable_tokens_delta")[0] != len(indices):
        s.mismatch(f"has {s.shape('trainable_tokens_delta')[0]} rows but token_indices lists {len(indices)}")
    return Parsed({"indices": tuple(indices)})


TUNERS: dict[str, TunerKind] = {
    "IA3": TunerKind(("ia3_l",), _ia3),
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
    "OFT": TunerKind(("oft_R.weight", "oft_embedding_R.weight"), _oft, required=()),
    "BOFT": TunerKind(("boft_R", "boft_s"), _boft),
    "FOURIERFT": TunerKind(("fourierft_spectrum",), _fourier("n_frequency_pattern", "dotted", 1000)),
    "LN_TUNING": TunerKind(("ln_tuning_layers.weight", "ln_tuning_layers.bias"), _ln_tuning, required=()),
    "MISS": TunerKind(("miss_block",), _miss),
    "HRA": TunerKind(("hra_u",), _hra),
    "RANDLORA": TunerKind(
        ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
        _randlora,
        shared=("randlora_A", "randlora_B"),
        required=("randlora_lambda", "randlora_gamma"),
    ),
    "SHIRA": TunerKind(("shira_weight", "shira_indices"), _shira),
    "C3A": TunerKind(("c3a_kernel",), _c3a),
    "ROAD": TunerKind(("road_theta", "road_alpha"), _road),
    "DELORA": TunerKind(("delora_A", "delora_B", "delora_lambda", "delora_w_norm"), _delora),
    "WAVEFT": TunerKind(("waveft_spectrum",), _fourier("n_frequency_pattern", "suffix", 2592)),
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
    "TRAINABLE_TOKENS": TunerKind(("trainable_tokens_delta",), _trainable_tokens),
}
