"""How quantities read in words, the same in every table, summary and progress bar: sizes in decimal units
(B, kB, MB, GB, TB: 1 kB = 1000 B, as file managers and the Hub show them) and durations."""

from __future__ import annotations

SIZE_UNITS = ("B", "kB", "MB", "GB", "TB")


def size(n: float) -> str:
    """`1870827520` -> `1.9 GB`; one decimal in the largest unit the size reaches."""
    exponent = next(i for i in reversed(range(len(SIZE_UNITS))) if n >= 1000**i or i == 0)
    return f"{n / 1000**exponent:.1f} {SIZE_UNITS[exponent]}"


def duration(seconds: float) -> str:
    """`42.4` -> `42 s`, `610` -> `10 min 10 s`, `7300` -> `2 h 1 min`."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
