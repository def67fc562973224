"""The command parser: the compiled one unless it is missing or
``FASTPOP_NO_EXTENSIONS`` is set (fastpop._compiled chooses)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastpop import _compiled

_impl = _compiled.load("fastpop.wire._parser")
PARSER_IMPL = _compiled.LOADED["fastpop.wire._parser"]  # "cython" or "python"

if TYPE_CHECKING:
    from fastpop.wire._parser_py import CommandParser
else:
    CommandParser = _impl.CommandParser

__all__ = ["CommandParser", "PARSER_IMPL"]
