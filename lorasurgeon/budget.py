"""One parameter budget for all modules (`--params N`): the ranks chosen together, exactly.

Keeping k_m singular values of module m costs k_m·c_m parameters (c_m = m_m + n_m) and leaves the error
Σ_{i>k_m} σ²_{m,i}. Minimising the total error under Σ k_m·c_m ≤ N is an integer knapsack over the items
(m, i), value σ²_{m,i}, weight c_m. Greedy by value/weight is not optimal when weights differ (the item that
does not fit may leave room a cheaper one would have used). The exact method:

1. Items of equal cost form a class. All weights in a class are equal, so its best j items are its j largest
   σ² — prefixes of each module, whose σ² do not increase: a class is one concave F_c(j), and only the count
   j_c per class is left to choose. (One class, e.g. a model of square matrices, is solved by this alone.)
2. Greedy by ratio gives a prefix y of the items sorted by σ²/c: every item in y has ratio ≥ λ, every other
   ≤ λ (λ the ratio of the first item that did not fit), and fewer than w_max parameters are left over.
   Proximity: some optimum x has |x_c − y_c|·w_c < P := (C − 1)·max lcm(w_a, w_b) + w_max for every class,
   with C classes. Proof: take an optimum closest to y in L1. (i) Were a class b under y with w_b of budget
   left, adding its next item (value ≥ 0) would be no worse and closer. (ii) Were a class a over y by at least
   w_b/g items and b under by at least w_a/g (g = gcd(w_a, w_b)), trading a's last w_b/g items (ratio ≤ λ)
   for b's next w_a/g (ratio ≥ λ) would cost the same, lose ≤ λ·lcm, gain ≥ λ·lcm, and be closer. So either
   every over-class has o_a·w_a < lcm or every under-class has u_b·w_b < lcm, at most C − 1 of them; the
   budget bounds the other side by that sum plus w_max. Every running sum of the deviations
   (x_c − y_c)·w_c, in any order of the classes, then lies in (−P, P).
3. A DP over the classes on that running deviation, in units of g = gcd of all costs and within (−P, P), with
   every deviation each class's window allows, finds that optimum (values in fp64).

Cost: (2P/g) states × Σ_c (window sizes) vector steps. Llama-7B (costs 8192 and 15104, g = 256) needs 3893
states × 186 steps; Llama-3-8B (5120, 8192, 18432) 395 × 149; an SDXL-like set of ten costs (1280 … 11520,
g = 128) about 21k × 9k (~3 s). Many classes with large lcms (odd shapes, g = 1) can make it too large: then
it refuses (UnsupportedError) rather than return an allocation it cannot prove optimal.
"""

from __future__ import annotations

import math

import torch

from lorasurgeon.errors import LorasurgeonError, UnsupportedError

DP_CELLS_LIMIT = 2_000_000_000  # states × steps; a few seconds of torch vector ops per 1e9

Classes = list[tuple[int, list[tuple[int, float]]]]  # (cost, [(module, σ²), ...] in descending σ²)


def allocate_budget(
    spectra: list[torch.Tensor], costs: list[int], budget: int, min_rank: int = 1, max_rank: int | None = None
) -> list[int]:
    """Ranks k_m minimising Σ_m Σ_{i>k_m} σ²_{m,i} subject to Σ_m k_m·costs[m] ≤ budget, exactly.

    `spectra[m]` is module m's complete spectrum (descending), `costs[m]` = m_m + n_m, the parameters one rank
    of it takes. Each k_m lies in [min(min_rank, len σ_m), min(max_rank, len σ_m)]; singular values that are
    exactly 0 are never bought above min_rank. Among equally good allocations the fewer parameters win.
    Raises LorasurgeonError when the budget cannot pay for `min_rank` everywhere, and UnsupportedError when
    the exact DP would exceed DP_CELLS_LIMIT.

    Example: allocate_budget([tensor([3., 1.]), tensor([2.])], [10, 4], 14, min_rank=0) == [1, 1]
    """
    floors = [min(min_rank, len(s)) for s in spectra]
    caps = [
        len(s) if max_rank is None else max(min(max_rank, len(s)), floor)
        for s, floor in zip(spectra, floors, strict=True)
    ]
    fixed = sum(f * c for f, c in zip(floors, costs, strict=True))
    if fixed > budget:
        raise LorasurgeonError(f"--params {budget}: below the {fixed} parameters that rank {min_rank} everywhere needs")
    classes = class_items(spectra, costs, floors, caps)
    ranks = list(floors)
    for (_, items), count in zip(classes, best_counts(classes, budget - fixed), strict=True):
        for module, _ in items[:count]:
            ranks[module] += 1
    return ranks


def class_items(spectra: list[torch.Tensor], costs: list[int], floors: list[int], caps: list[int]) -> Classes:
    """The items above each floor, grouped by cost (ascending), each class sorted by σ² descending.

    The sort is stable over module-major order, so a class's first j items are a prefix of every module.
    """
    by_cost: dict[int, list[tuple[int, float]]] = {}
    for module, (sigma, cost) in enumerate(zip(spectra, costs, strict=True)):
        gains = sigma.double().square().tolist()[floors[module] : caps[module]]
        by_cost.setdefault(cost, []).extend((module, g) for g in gains if g > 0)
    return [(cost, sorted(items, key=lambda item: -item[1])) for cost, items in sorted(by_cost.items())]


def greedy_prefix(classes: Classes, budget: int) -> tuple[list[int], int, bool]:
    """(y_c per class, parameters y uses, whether every item fitted): items by σ²/cost while they fit."""
    order = sorted(
        ((gain / cost, c) for c, (cost, items) in enumerate(classes) for _, gain in items), key=lambda t: -t[0]
    )
    counts, used = [0] * len(classes), 0
    for _, c in order:
        if used + classes[c][0] > budget:
            return counts, used, False
        used += classes[c][0]
        counts[c] += 1
    return counts, used, True


def best_counts(classes: Classes, budget: int) -> list[int]:
    """How many of each class's items an optimal allocation takes (steps 2 and 3 of the module docstring)."""
    y, used, everything = greedy_prefix(classes, budget)
    if everything or len(classes) < 2:
        return y
    weights = [cost for cost, _ in classes]
    reach = (len(classes) - 1) * max(math.lcm(a, b) for a in weights for b in weights if a != b) + max(weights)
    unit = math.gcd(*weights)
    half = (reach - 1) // unit  # deviations in units, strictly inside (−P, P)
    windows = [
        range(max(-y[c], -((reach - 1) // w)), min(len(items) - y[c], (reach - 1) // w) + 1)
        for c, (w, items) in enumerate(classes)
    ]
    if (2 * half + 1) * sum(len(w) for w in windows) > DP_CELLS_LIMIT:
        raise UnsupportedError(
            f"--params: an exact allocation over {len(classes)} classes of module sizes would take more than "
            f"{DP_CELLS_LIMIT:,} DP steps; use --rank, --energy, --ratio or --fro instead"
        )
    value = torch.full((2 * half + 1,), -math.inf, dtype=torch.float64)
    value[half] = 0.0
    choices = []
    for c, (w, items) in enumerate(classes):
        value, chosen = _add_class(value, items, y[c], windows[c], w // unit)
        choices.append(chosen)
    slack = (budget - used) // unit  # < w_max/unit ≤ half
    state = int(torch.argmax(value[: half + slack + 1]).item())  # the first maximum: the fewest parameters
    counts = list(y)
    for c in reversed(range(len(classes))):
        d = int(choices[c][state].item())
        counts[c] += d
        state -= d * (classes[c][0] // unit)
    return counts


def _add_class(
    value: torch.Tensor, items: list[tuple[int, float]], start: int, window: range, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DP step: best[t] = max over d in `window` of value[t − d·step] + F(start + d) − F(start)."""
    size = len(value)
    prefix = torch.cumsum(torch.tensor([0.0] + [g for _, g in items], dtype=torch.float64), 0)
    best = torch.full_like(value, -math.inf)
    chosen = torch.zeros(size, dtype=torch.int64)
    for d in window:  # ascending, and only a strictly better value replaces: ties keep the smaller d
        shift = d * step
        src, dst = (
            (slice(0, size - shift), slice(shift, size))
            if shift >= 0
            else (slice(-shift, size), slice(0, size + shift))
        )
        candidate = value[src] + float(prefix[start + d] - prefix[start])
        better = candidate > best[dst]
        best[dst] = torch.where(better, candidate, best[dst])
        chosen[dst] = torch.where(better, d, chosen[dst])
    return best, chosen
