"""Chooses the command parser: the compiled one unless it is missing or
``FASTPOP_NO_EXTENSIONS`` is set (as multidict and aiohttp do)."""

from __future__ import annotations

import os

from fastpop.wire import _parser_py

PARSER_IMPL: str
if os.environ.get("FASTPOP_NO_EXTENSIONS"):
    CommandParser = _parser_py.CommandParser
    PARSER_IMPL = "python"
else:
    try:
        from fastpop.wire._parser import CommandParser  # type: ignore[assignment]

        PARSER_IMPL = "cython"
    except ImportError:
        CommandParser = _parser_py.CommandParser
        PARSER_IMPL = "python"

__all__ = ["CommandParser", "PARSER_IMPL"]
