"""How each extracted matrix's rank is chosen, and by which SVD method: the options of `extract` that need no
tensor, validated before torch is imported (lorasurgeon.decomposition applies them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorasurgeon.errors import LorasurgeonError, Option

Method = Literal["auto", "exact", "randomized"]
METHODS: tuple[Method, ...] = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class RankRule:
    """How a matrix's rank is chosen (`rank`, or the smallest keeping `energy` of ‖ΔW‖², at most `max_rank`), by
    which SVD `method`, and the extra ranks whose error to report (`curve`); `validate` names the first bad one."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    method: str = "auto"
    curve: tuple[int, ...] = ()
    seed: int = 0

    def validate(self, dry_run: bool) -> None:
        if (self.rank is None) == (self.energy is None) and not (self.curve and dry_run and self.energy is None):
            raise LorasurgeonError(
                "give exactly one of ", Option("rank", metavar="R"), " or ", Option("energy", metavar="F"), " (or ",
                Option("curve"),
                " with ", Option("dry_run", flag=True), ")",
            )  # fmt: skip
        if self.rank is not None and self.rank < 1:
            raise LorasurgeonError(Option("rank", self.rank), ": must be at least 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorasurgeonError(Option("energy", self.energy), ": must be in (0, 1]")
        if self.max_rank is not None and (self.energy is None or self.max_rank < 1):
            raise LorasurgeonError(Option("max_rank", self.max_rank), ": needs energy and must be at least 1")
        if self.method not in METHODS:
            raise LorasurgeonError(Option("method", self.method), f": expected one of {', '.join(METHODS)}")
        if any(r < 1 for r in self.curve):
            raise LorasurgeonError(Option("curve", ",".join(map(str, self.curve))), ": ranks must be at least 1")

    def sketch_rank(self, shape: tuple[int, int]) -> int:
        """How many singular triplets to compute for a matrix: the rank bound, the curve's largest rank."""
        bound = self.rank or self.max_rank or min(shape)
        return min(max(bound, *self.curve), min(shape)) if self.curve else min(bound, min(shape))
