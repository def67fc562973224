"""The terminal output of ``fastpop bench``: rich when installed (the
``fastpop[bench]`` extra), else plain text with the same content, so the core
install runs the benchmark too.  Only the few calls bench makes are here:
``console``, ``table``, ``grid``, ``text``."""

from __future__ import annotations

import re
import sys
from typing import Any

try:
    import rich  # noqa: F401  (only whether it is there)

    RICH = True
except ImportError:
    RICH = False

_MARKUP = re.compile(r"\[/?(?:bold |dim )?(?:red|green|yellow|bold|dim)\]")


def console(**kwargs: Any) -> Any:
    """A rich Console (same arguments), or a plain one writing to stdout."""
    if RICH:
        from rich.console import Console

        return Console(**kwargs)
    return PlainConsole()


def table(**kwargs: Any) -> Any:
    """A rich Table (title, show_header, header_style), or a plain one."""
    if RICH:
        from rich.table import Table

        return Table(**kwargs)
    return PlainTable(title=kwargs.get("title"), show_header=kwargs.get("show_header", True))


def grid(**kwargs: Any) -> Any:
    """A rich Table.grid (no title, no header), or a plain one."""
    if RICH:
        from rich.table import Table

        return Table.grid(**kwargs)
    return PlainTable(show_header=False, separator=False)


def text(markup: str) -> Any:
    """rich Text from markup, or the string with its markup removed."""
    if RICH:
        from rich.text import Text

        return Text.from_markup(markup)
    return _MARKUP.sub("", markup)


class PlainTable:
    """Columns padded to their widest cell; a cell may span lines."""

    def __init__(self, title: str | None = None, show_header: bool = True, separator: bool = True) -> None:
        self.title = _MARKUP.sub("", title) if title else None
        self.show_header = show_header
        self.separator = separator
        self.columns: list[tuple[str, str]] = []  # (header, justify)
        self.rows: list[list[str]] = []

    def add_column(self, header: str = "", justify: str = "left", **_style: Any) -> None:
        self.columns.append((header, justify))

    def add_row(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        rows = ([[h for h, _ in self.columns]] if self.show_header else []) + self.rows
        widths = [max((len(line) for r in rows for line in (r[i] if i < len(r) else "").split("\n")), default=0)
                  for i in range(len(self.columns))]
        out = [self.title] if self.title else []
        for n, row in enumerate(rows):
            cells = [(row[i] if i < len(row) else "").split("\n") for i in range(len(self.columns))]
            for k in range(max(len(c) for c in cells) if cells else 0):
                parts = []
                for i, (_, justify) in enumerate(self.columns):
                    line = cells[i][k] if k < len(cells[i]) else ""
                    parts.append(line.rjust(widths[i]) if justify == "right" else line.ljust(widths[i]))
                out.append("  ".join(parts).rstrip())
            if n == 0 and self.show_header and self.separator:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)


class PlainConsole:
    """print() with the Console arguments bench passes ignored; never a terminal
    (so progress comes as lines, not a live display)."""

    is_terminal = False

    def print(self, item: Any = "", markup: bool = True, **_options: Any) -> None:
        if isinstance(item, PlainTable):
            item = item.render()
        elif isinstance(item, str) and markup:
            item = _MARKUP.sub("", item)
        print(item, file=sys.stdout, flush=True)
