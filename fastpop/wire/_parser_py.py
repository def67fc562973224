"""Pure-Python twin of ``fastpop.wire._parser`` (same API, same results).

Used when the compiled extension is missing or ``FASTPOP_NO_EXTENSIONS=1``.
The hypothesis tests feed both implementations the same byte streams, split
at the same points, and require identical output.
"""

from __future__ import annotations

import re
from typing import Literal

from fastpop.wire.commands import (
    KEYWORDS,
    MAX_COMMAND_LINE,
    MAX_CONTINUATION_LINE,
    REST_OF_LINE,
    Command,
)

_TOO_LONG = (int(Command.TOO_LONG), ())
_INVALID = (int(Command.INVALID), ())
_BAD_ASCII = re.compile(rb"[\x00-\x1f\x7f-\xff]").search
_BAD_UTF8 = re.compile(rb"[\x00-\x1f\x7f]").search


class CommandParser:
    """Frames a byte stream into POP3 command lines.

    ``feed()`` appends received bytes; ``next_command()`` returns the next
    complete command as ``(code, args)`` or ``None``.  Lines end in CRLF or a
    bare LF.  A line longer than ``max_line`` octets (terminator included) is
    reported once as ``Command.TOO_LONG`` and skipped without being buffered.
    ``next_line()`` returns a raw SASL continuation line, limited by
    ``max_continuation`` instead.  No method raises on any input.
    """

    __slots__ = ("_buf", "_pos", "_skipping", "max_line", "max_continuation", "utf8")

    def __init__(
        self,
        max_line: int = MAX_COMMAND_LINE,
        max_continuation: int = MAX_CONTINUATION_LINE,
    ) -> None:
        self._buf = b""
        self._pos = 0
        self._skipping = False
        self.max_line = max_line
        self.max_continuation = max_continuation
        self.utf8 = False

    def feed(self, data: bytes) -> None:
        data = bytes(data)
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data = data[nl + 1 :]
            self._skipping = False
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def discard(self) -> None:
        """Drop everything buffered (STLS: nothing sent before TLS may count)."""
        self._buf = b""
        self._pos = 0
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def _take_line(self, limit: int) -> tuple[int, int] | Literal[Command.TOO_LONG] | None:
        """(start, end) of the next line without terminator; TOO_LONG; or None."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return None
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos >= limit:
                self._buf, self._pos, self._skipping = b"", 0, True
                return Command.TOO_LONG
            return None
        self._pos = nl + 1
        if nl + 1 - pos > limit:
            return Command.TOO_LONG
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        return pos, end

    def next_command(self) -> tuple[int, tuple[str, ...]] | None:
        span = self._take_line(self.max_line)
        if span is None:
            return None
        if span is Command.TOO_LONG:
            return _TOO_LONG
        start, end = span
        line = self._buf[start:end]
        encoding = "utf-8" if self.utf8 else "ascii"
        if self.utf8:
            if _BAD_UTF8(line):
                return _INVALID
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return _INVALID
        elif _BAD_ASCII(line):
            return _INVALID
        sp = line.find(b" ")
        keyword = line if sp < 0 else line[:sp]
        code = KEYWORDS.get(keyword.upper(), 0)
        if code == 0 or sp < 0:
            return (code, ())
        if code in REST_OF_LINE:
            rest = line[sp + 1 :]
            return (code, (rest.decode(encoding),) if rest else ())
        return (code, tuple(a.decode(encoding) for a in line[sp + 1 :].split(b" ") if a))

    def next_line(self) -> tuple[bool, bytes] | None:
        """Next SASL continuation line: (True, line), (False, b"") if too long, or None."""
        span = self._take_line(self.max_continuation)
        if span is None:
            return None
        if span is Command.TOO_LONG:
            return (False, b"")
        start, end = span
        return (True, self._buf[start:end])
