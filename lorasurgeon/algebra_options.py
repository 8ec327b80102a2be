"""The options of `resize` and `combine`, validated before torch is imported (its import takes seconds): which rank
rule (spectrum_rules), which method and its density, OUT's format, and each adapter's weight (`--weight`,
`--weights FILE` through client_weights, `--mean`). lorasurgeon.algebra runs them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorasurgeon.adapter import ADAPTER_FORMATS, AdapterFormat
from lorasurgeon.client_weights import read_weights
from lorasurgeon.combination import DENSE_METHODS, METHODS, Method
from lorasurgeon.errors import LorasurgeonError, Option
from lorasurgeon.spectrum_rules import SpectrumRule


@dataclass(frozen=True)
class AlgebraOptions:
    """How to combine: `method`; the rank `rule` (None: cat, or the largest input rank) or one `params` budget
    (resize); `density` and `seed` for the dense methods; `report_naive` FedIT's error per module; OUT's format
    `to` (None: the first adapter's)."""

    method: Method = "svd"
    rule: SpectrumRule | None = None
    params: int | None = None
    density: float | None = None
    seed: int = 0
    report_naive: bool = False
    to: AdapterFormat | None = None


def resize_options(rules: dict[str, float | None], to: str | None) -> AlgebraOptions:
    """AlgebraOptions of `resize` from its rank rules (exactly one of rank, energy, ratio, fro, params given)."""
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) != 1:
        metavars = {"rank": "R", "energy": "F", "ratio": "X", "fro": "F", "params": "N"}
        parts: list[str | Option] = ["resize needs exactly one of "]
        for i, name in enumerate(rules):
            parts += [Option(name, metavar=metavars.get(name, "…")), ", " if i < len(rules) - 1 else ""]
        raise LorasurgeonError(*parts, f" (given: {', '.join(given) or 'none'})")
    (name, value), target = next(iter(given.items())), _target(to)
    if name == "params":
        if value != int(value) or value < 1:
            raise LorasurgeonError(Option("params", value), ": must be a whole number of parameters, at least 1")
        return AlgebraOptions(params=int(value), to=target)
    return AlgebraOptions(rule=SpectrumRule(name, value), to=target)  # type: ignore[arg-type]


def combine_options(
    method: str | None,
    rules: dict[str, float | None],
    density: float | None,
    seed: int,
    report_naive: bool,
    to: str | None,
) -> AlgebraOptions:
    """AlgebraOptions of `combine`: the method defaults to svd when a rank rule is given, else cat."""
    given = {name: value for name, value in rules.items() if value is not None}
    if len(given) > 1:
        raise LorasurgeonError(Option("rank", metavar="R"), " and ", Option("energy", metavar="F"), " are exclusive")
    chosen = method or ("svd" if given else "cat")
    if chosen not in METHODS:
        raise LorasurgeonError(Option("method", chosen), f": expected one of {', '.join(METHODS)}")
    if chosen == "cat" and given:
        raise LorasurgeonError(
            Option("method", "cat"), " keeps every term at rank Σ rᵢ; re-compress with ", Option("method", "svd")
        )
    dense = chosen in DENSE_METHODS
    if dense != (density is not None):
        needs = "needs" if dense else "is only for ties, dare, dare_ties and magnitude_prune, not"
        raise LorasurgeonError(Option("density", metavar="D"), f" {needs} ", Option("method", chosen))
    if report_naive and dense:
        raise LorasurgeonError(Option("report_naive", flag=True), " compares FedIT with the exact sum of cat or svd")
    if density is not None and not 0 < density <= 1:
        raise LorasurgeonError(Option("density", density), ": must be in (0, 1]")
    rule = SpectrumRule(*next(iter(given.items()))) if given else None  # type: ignore[arg-type]
    return AlgebraOptions(next(m for m in METHODS if m == chosen), rule, None, density, seed, report_naive, _target(to))


def combine_weights(
    inputs: Sequence[str | Path], weights: Sequence[float] | None, weights_file: str | Path | None, mean: bool
) -> list[float]:
    """Each adapter's weight: `weights` (one per adapter), `weights_file` (client_weights), or 1; with `mean`
    divided by their sum (FedAvg)."""
    if weights and weights_file is not None:
        raise LorasurgeonError(
            Option("weights", cli="weight"), " and ", Option("weights_file", cli="weights"), " exclude each other"
        )
    paths = [Path(p) for p in inputs]
    if weights_file is not None:
        chosen = read_weights(Path(weights_file), paths)
    else:
        chosen = [float(w) for w in weights] if weights else [1.0] * len(paths)
    if mean:
        total = sum(chosen)
        if total == 0 or not math.isfinite(total):
            raise LorasurgeonError(Option("mean", flag=True), f": the weights sum to {total}, so they have no mean")
        chosen = [w / total for w in chosen]
    return chosen


def _target(to: str | None) -> AdapterFormat | None:
    if to is None:
        return None
    if to not in ADAPTER_FORMATS:
        raise LorasurgeonError(Option("to", to), f": expected one of {', '.join(ADAPTER_FORMATS)}")
    return next(f for f in ADAPTER_FORMATS if f == to)
