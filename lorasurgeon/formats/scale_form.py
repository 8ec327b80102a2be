"""How an adapter that lorasurgeon writes states each module's scale: the single-alpha form, or PEFT's patterns.

Readers of adapter_config.json disagree. PEFT (and vLLM 0.33) read rank_pattern, alpha_pattern and use_rslora;
llama.cpp's convert_lora_to_gguf.py reads one `lora_alpha` and takes each module's rank from its B tensor
(scale α/rᵢ, no alpha_pattern, no rsLoRA); SGLang, TGI and LoRAX apply α/r of the config's r to every module.
An extract with per-module ranks and a matching alpha_pattern (scale 1 everywhere) reached llama.cpp at
scale α/rᵢ: up to 100 % off (bench/results/llamacpp.md).

So the adapters lorasurgeon writes (extract, convert, resize, combine) use the **single-alpha form** by default:
one `lora_alpha` α, no alpha_pattern, use_rslora false, ranks as rank_pattern where they differ, and each
module's scale folded into B: B′ = B·cᵢ with cᵢ = sᵢ·rᵢ/α, so that every reader applying α/rᵢ gives
α/rᵢ·B′A = sᵢ·BA, PEFT's ΔW, up to one rounding of B. α is the most frequent sᵢ·rᵢ, so that most modules keep
cᵢ = 1 and their B bit for bit. With one rank for every module (`rank`, as `convert --for` pads to) the config's
r is that rank and readers of the global α/r agree too. The **patterns form** (`patterns=True`, PEFT only) keeps
each module's own alpha, or rsLoRA, and folds nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorasurgeon.formats.peft_config_writer import WrittenModule, json_number, written


@dataclass(frozen=True)
class ScaleForm:
    """What to write: `use_rslora`, each module's path, rank and alpha for the config (WrittenModule), and
    `factors`, the cᵢ each module's B (and lora_B bias) is multiplied by, in the order of the modules given."""

    use_rslora: bool
    modules: tuple[WrittenModule, ...]
    factors: tuple[float, ...]

    @property
    def folded(self) -> tuple[str, ...]:
        """The paths of the modules whose B is rewritten (cᵢ ≠ 1)."""
        return tuple(m.path for m, c in zip(self.modules, self.factors, strict=True) if c != 1.0)


def scale_form(
    paths: Sequence[str],
    modules: Sequence[tuple[int, float, float]],
    *,
    patterns: bool = False,
    rank: int | None = None,
    alpha: float | None = None,
) -> ScaleForm:
    """The form in which PEFT gives each module (rank, alpha, scale) its scale; see the module docstring.

    `paths` name the modules as the config will (`model.layers.0.self_attn.q_proj`). `rank` writes every module
    at that one rank (its factors padded with zeros by the caller); `alpha` is the one lora_alpha to write (default:
    the most frequent sᵢ·rᵢ). `patterns` cannot be combined with `rank` or `alpha`.

    >>> form = scale_form(["q", "k"], [(8, 8.0, 1.0), (4, 4.0, 1.0)])  # what extract --energy finds
    >>> [m.alpha for m in form.modules], form.factors
    ([8.0, 8.0], (1.0, 0.5))
    """
    if patterns:
        if rank is not None or alpha is not None:
            raise ValueError("the patterns form keeps each module's own rank and alpha")
        use_rslora, kept = written(paths, modules)
        return ScaleForm(use_rslora, tuple(kept), (1.0,) * len(kept))
    ranks = [rank if rank is not None else r for r, _, _ in modules]
    if alpha is None:
        alpha = single_alpha([s * r for r, (_, _, s) in zip(ranks, modules, strict=True)], ranks)
    one = alpha
    states = tuple(WrittenModule(p, r, one) for p, r in zip(paths, ranks, strict=True))
    factors = tuple(s * r / one for r, (_, _, s) in zip(ranks, modules, strict=True))
    return ScaleForm(False, states, factors)


def single_alpha(products: Sequence[float], ranks: Sequence[int]) -> float:
    """The one lora_alpha: the most frequent sᵢ·rᵢ that is not 0 (ties: the largest), so that the most modules
    keep cᵢ = 1; the most frequent rank when every scale is 0 (their B′ are then 0 whatever α is)."""
    counts = Counter(p for p in products if p != 0.0)
    if not counts:
        return float(Counter(ranks).most_common(1)[0][0]) if ranks else 1.0
    best = max(counts.values())
    return max(p for p, n in counts.items() if n == best)


def restated(source: dict[str, Any], form: ScaleForm) -> dict[str, Any]:
    """A PEFT source's config stating `form`: one lora_alpha (and an emptied alpha_pattern) when every module has
    the same alpha, use_rslora as the form has it, and one r (an emptied rank_pattern) when every module has the
    same rank; every other field as it was. A config already in the form comes back unchanged."""
    out = dict(source)
    alphas, ranks = {m.alpha for m in form.modules}, {m.rank for m in form.modules}
    if len(alphas) == 1 and (source.get("alpha_pattern") or float(source.get("lora_alpha", 8)) != min(alphas)):
        out["lora_alpha"] = json_number(min(alphas))
        out |= {"alpha_pattern": {}} if "alpha_pattern" in source else {}
    if form.use_rslora != bool(source.get("use_rslora")):
        out["use_rslora"] = form.use_rslora
    if len(ranks) == 1 and (source.get("rank_pattern") or source.get("r", 8) != min(ranks)):
        out["r"] = min(ranks)
        out |= {"rank_pattern": {}} if "rank_pattern" in source else {}
    return out
