"""Tables that fit the terminal they are printed on, decided when they are drawn, at the width there is.

Numbers (and short labels: dtypes, methods) are never cut: their columns never wrap. When a table is wider than
the terminal, it first drops its borders and padding, keeping one space between columns; if it is still too
wide, long names give up the room, each first losing as much of the prefix every row of its column shares as it
must (shown as `…`, so the part that differs stays), then breaking after its dots and slashes onto more lines.
Nothing is cut off with an ellipsis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# name: a tensor, module or file name (wraps after dots and slashes); text: words (wraps at spaces); number and
# label: never wrap, right- and left-justified.
Kind = Literal["name", "text", "number", "label"]
PIECES = re.compile(r"[^./]*[./]|[^./]+")  # a name's pieces, each ending after its separator
ELIDED = "…"


@dataclass(frozen=True)
class Column:
    header: str
    kind: Kind = "number"


def shared_prefix(names: Iterable[str]) -> int:
    """The length of the prefix all `names` share, up to and including its last dot or slash (0 for one name)."""
    names = list(names)
    if len(names) < 2:
        return 0
    first, last = min(names), max(names)  # what these two share, all names between them share
    common = next((first[:i] for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), first)
    return max(common.rfind("."), common.rfind("/")) + 1


def wrap(name: str, shared: int, width: int) -> list[str]:
    """`name` in lines of at most `width`: whole when it fits; else on one line without as few of the pieces of
    its first `shared` characters (the prefix its column shares) as make it fit, shown as `…`; else without all
    of them, broken after dots and slashes. A piece longer than a line is folded, the only split of a piece."""
    width = max(width, 1)
    if len(name) <= width:
        return [name]
    for cut in (m.end() for m in PIECES.finditer(name[:shared])):
        if len(name) - cut + len(ELIDED) <= width:
            return [ELIDED + name[cut:]]
    text = ELIDED + name[shared:] if shared else name
    lines, line = [], ""
    for piece in PIECES.findall(text):
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
        while len(line) > width:
            lines.append(line[:width])
            line = line[width:]
    return [*lines, line] if line else lines


class Name:
    """A name in a table cell that wraps as `wrap` says, at whatever width its column is given."""

    def __init__(self, text: str, shared: int = 0) -> None:
        self.text, self.shared = text, shared

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(max(len(piece) for piece in PIECES.findall(self.text)), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text("\n".join(wrap(self.text, self.shared, options.max_width)), no_wrap=True, overflow="crop")


class Fitted:
    """A table built at draw time for the width there is (see the module docstring); `total` is a bold last row."""

    def __init__(
        self,
        columns: Sequence[Column],
        rows: Sequence[Sequence[str]],
        title: str | None = None,
        total: Sequence[str] | None = None,
    ) -> None:
        self.columns, self.rows, self.title, self.total = columns, rows, title, total
        self.shared = [shared_prefix(row[i] for row in rows) if c.kind == "name" else 0 for i, c in enumerate(columns)]

    def build(self, compact: bool) -> Table:
        table = Table(title=self.title, title_justify="left")
        if compact:
            table.box, table.padding, table.show_edge = box.SIMPLE_HEAD, (0, 0), False  # one space between columns
        for column in self.columns:
            table.add_column(column.header, justify="right" if column.kind == "number" else "left")
            table.columns[-1].no_wrap = column.kind in ("number", "label")
        for row in self.rows:
            table.add_row(*(self._cell(i, value) for i, value in enumerate(row)))
        if self.total is not None:
            table.add_row(*self.total, style="bold")
        return table

    def _cell(self, index: int, value: str) -> Name | str:
        return Name(value, self.shared[index]) if self.columns[index].kind == "name" else value

    def choose(self, console: Console, options: ConsoleOptions) -> Table:
        table = self.build(compact=False)
        natural = Measurement.get(console, options.update_width(1 << 16), table).maximum
        return table if natural <= options.max_width else self.build(compact=True)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.choose(console, options))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.choose(console, options)
