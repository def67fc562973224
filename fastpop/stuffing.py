"""The RFC 1939 transform of a stored message into what RETR/TOP send.

Bare LF becomes CRLF (a bare CR is an ordinary octet and passes through),
every line starting with "." gets another ".", and a non-empty message that
does not end in a newline gets a final CRLF.  ``pop3_size`` gives the size
RETR sends before stuffing, which STAT and LIST must report.
"""

from __future__ import annotations

CHUNK = 256 * 1024


class DotStuffer:
    """Streaming transform; feed chunks split anywhere, then finish()."""

    __slots__ = ("_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if not chunk:
            return b""
        if chunk[-1] == 13:  # hold back a trailing CR: the LF may be in the next chunk
            chunk = chunk[:-1]
            self._pending_cr = True
            if not chunk:
                return b""
        out = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").replace(b"\n.", b"\n..")
        if self._line_start and out[0] == 46:
            out = b"." + out
        self._line_start = out[-1] == 10
        return out

    def finish(self) -> bytes:
        """What must follow the last chunk (before the ".\\r\\n" terminator)."""
        out = b""
        if self._pending_cr:
            out = b"\r"
            self._pending_cr = False
            self._line_start = False
        if not self._line_start:
            out += b"\r\n"
            self._line_start = True
        return out


def stuff_message(data: bytes) -> bytes:
    """Whole-message transform (the common, small-message path)."""
    s = DotStuffer()
    return s.feed(data) + s.finish()


class TopLimiter:
    """Cuts transformed output after the header and ``lines`` body lines.

    It works on DotStuffer output, which never ends a chunk between CR and
    LF, so an empty line can only straddle chunks as a leading CRLF.
    """

    __slots__ = ("_in_headers", "_left", "_line_start", "done")

    def __init__(self, lines: int) -> None:
        self._in_headers = True
        self._left = lines
        self._line_start = True
        self.done = False

    def feed(self, out: bytes) -> bytes:
        if self.done or not out:
            return b""
        start = 0
        if self._in_headers:
            if self._line_start and out.startswith(b"\r\n"):
                start = 2
            else:
                idx = out.find(b"\r\n\r\n")
                if idx < 0:
                    self._line_start = out[-1] == 10
                    return out
                start = idx + 4
            self._in_headers = False
        left = self._left
        if out.count(b"\n", start) < left:
            self._left = left - out.count(b"\n", start)
            self._line_start = out[-1] == 10
            return out
        pos = start
        for _ in range(left):
            pos = out.index(b"\n", pos) + 1
        self.done = True
        self._line_start = True
        return out[:pos]


def pop3_size_of(data: bytes) -> int:
    """Octets RETR sends for this stored content, before dot-stuffing."""
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    return len(data) + bare_lf + (0 if data[-1] == 10 else 2)


def pop3_size(path: str) -> int:
    """pop3_size_of() for a file, read in bounded chunks."""
    total = bare_lf = 0
    prev_cr = False
    last = -1
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
            bare_lf += chunk.count(b"\n") - chunk.count(b"\r\n")
            if prev_cr and chunk[0] == 10:
                bare_lf -= 1
            prev_cr = chunk[-1] == 13
            last = chunk[-1]
    if total == 0:
        return 0
    return total + bare_lf + (0 if last == 10 else 2)
