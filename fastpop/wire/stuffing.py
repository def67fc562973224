"""The RFC 1939 transform of a stored message into what RETR/TOP send.

``DotStuffer``, ``stuff_message`` and ``pop3_size_of`` come from the compiled
``fastpop.wire._stuffing`` or its pure-Python twin (fastpop._compiled
chooses).  This module adds what works on their output or on files: TOP's
cut, ``pop3_size`` of a file, the size RETR sends before stuffing,
which STAT and LIST must report, and ``scan_file``, which also tells whether
any line of the file starts with "." (the index keeps it: RETR of a file
without such a line needs no scan).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from fastpop import _compiled

_impl = _compiled.load("fastpop.wire._stuffing")
STUFFING_IMPL = _compiled.LOADED["fastpop.wire._stuffing"]  # "cython" or "python"

if TYPE_CHECKING:
    from fastpop.wire._stuffing_py import (
        DotStuffer,
        first_dot_line,
        line_dots,
        pop3_size_of,
        stuff_message,
    )
else:
    DotStuffer, line_dots, first_dot_line = _impl.DotStuffer, _impl.line_dots, _impl.first_dot_line
    pop3_size_of, stuff_message = _impl.pop3_size_of, _impl.stuff_message

__all__ = ["CHUNK", "DotStuffer", "STUFFING_IMPL", "TopLimiter", "first_dot_line", "line_dots", "pop3_size",
           "pop3_size_of", "scan_file", "stuff_message"]

CHUNK = 256 * 1024


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

    @property
    def in_headers(self) -> bool:
        """No empty line (the header's end) has gone through yet."""
        return self._in_headers

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
        newlines = out.count(b"\n", start)
        if newlines < left:
            self._left = left - newlines
            self._line_start = out[-1] == 10
            return out
        pos = start
        for _ in range(left):
            pos = out.index(b"\n", pos) + 1
        self.done = True
        self._line_start = True
        return out[:pos]


def pop3_size(file: str | int) -> int:
    """pop3_size_of() for a file, read in bounded chunks: a path, or an open
    descriptor (read with pread: its offset is left where it was; up to its
    size now, its holes not read: see scan_file)."""
    if isinstance(file, int):
        return scan_file(file, os.fstat(file).st_size)[0]
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return scan_file(fd, os.fstat(fd).st_size)[0]
    finally:
        os.close(fd)


def scan_file(fd: int, size: int, count_size: bool = True) -> tuple[int, bool, int]:
    """Reads the first ``size`` octets of an open file with pread (its offset
    is left where it was), through one bounded buffer.  Returns the
    pop3_size of what it read (0 unless ``count_size``), whether a line of it
    starts with ".", and its last octet (-1 if the file ended before ``size``
    or the scan stopped early).  Without ``count_size`` it stops at the
    first line that starts with "."."""
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    offset = bare_lf = 0
    prev_cr = False
    after_lf = True  # the start of the file is the start of a line
    dots = False
    last = -1
    sparse_aware = size > CHUNK  # (a smaller file is read in one pread whatever it holds)
    while offset < size:
        data = _next_data(fd, offset, size) if sparse_aware else offset
        if data > offset:  # a hole: zeros the file system does not store, so not read
            prev_cr = after_lf = False
            last = 0
            offset = data
            continue
        n = os.preadv(fd, [view[: min(len(buf), size - offset)]], offset)
        if n == 0:  # shorter than it was: measured as it is
            break
        if not dots and first_dot_line(view[:n], after_lf) >= 0:
            dots = True
            if not count_size:
                return 0, True, -1
        if count_size:
            bare_lf += buf.count(b"\n", 0, n) - buf.count(b"\r\n", 0, n)
            if prev_cr and buf[0] == 10:
                bare_lf -= 1
            prev_cr = buf[n - 1] == 13
        last = buf[n - 1]
        after_lf = last == 10
        offset += n
    total = offset + bare_lf + (0 if last == 10 else 2) if count_size and offset else 0
    return total, dots, last if offset == size else -1


def _next_data(fd: int, offset: int, size: int) -> int:
    """Where the next stored data of the file starts, from ``offset`` (capped
    at ``size``).  A file's user can make it sparse: terabytes of holes that
    cost no disk, which reading would take hours to go through; what is
    read stays what the file really holds.  ``offset`` itself where the file
    system cannot tell (every octet is data then).  The offset of ``fd`` is
    left where it was."""
    if _SEEK_DATA is None:
        return offset
    here = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        return min(os.lseek(fd, offset, _SEEK_DATA), size)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            return offset  # (EINVAL: not supported here)
        # no data from offset on: a hole up to the end, or the file is shorter now
        return max(offset, min(size, os.fstat(fd).st_size))
    finally:
        os.lseek(fd, here, os.SEEK_SET)


_SEEK_DATA = getattr(os, "SEEK_DATA", None)
