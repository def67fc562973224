"""Pure-Python twin of ``fastpop.wire._stuffing``: the RFC 1939 transform.

Bare LF becomes CRLF (a bare CR is an ordinary octet and passes through),
every line starting with "." gets another ".", and a non-empty message that
does not end in a newline gets a final CRLF.  Both implementations must give
identical output for any input split into any chunks.
"""

from __future__ import annotations


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
    if (data[:1] != b"." and data.endswith(b"\r\n") and data.find(b"\n.") < 0
            and data.count(b"\n") == data.count(b"\r\n")):
        return bytes(data)  # already its own transform: CRLF lines, none starting with "."
    s = DotStuffer()
    return s.feed(data) + s.finish()


def pop3_size_of(data: bytes) -> int:
    """Octets RETR sends for this stored content, before dot-stuffing."""
    if not data:
        return 0
    bare_lf = data.count(b"\n") - data.count(b"\r\n")
    return len(data) + bare_lf + (0 if data[-1] == 10 else 2)


def line_dots(buf, base: int, after_lf: bool, out: list, most: int = -1) -> bool:
    """Appends base + i for every buf[i] == "." that starts a line; a line
    starts at buf[0] if after_lf.  Returns whether buf ends with LF.
    ``most`` (if not negative): stops once it has appended that many."""
    if len(buf) == 0:
        return after_lf
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(buf)  # (a memoryview has no find)
    added = 0
    if after_lf and buf[0] == 46 and most != 0:
        out.append(base)
        added = 1
    i = buf.find(b"\n.")
    while i >= 0 and added != most:
        out.append(base + i + 1)
        added += 1
        i = buf.find(b"\n.", i + 2)
    return buf[len(buf) - 1] == 10


def first_dot_line(buf, after_lf: bool) -> int:
    """The offset of the first "." that starts a line in buf (a line starts at
    buf[0] if after_lf), or -1 if no line of buf starts with one."""
    if len(buf) == 0:
        return -1
    if after_lf and buf[0] == 46:
        return 0
    if not isinstance(buf, (bytes, bytearray)):
        buf = bytes(buf)  # (a memoryview has no find)
    i = buf.find(b"\n.")
    return i + 1 if i >= 0 else -1
