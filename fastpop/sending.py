"""Where message bytes reach the socket: RETR and TOP responses.

Three paths, chosen by the protocol:

- small messages are read whole, transformed and queued as one write
  together with the status line and terminator;
- larger messages stored with CRLF line ends go out with sendfile(2)
  (``SendfileStream``), split at lines that start with "." so the stuffing
  dot can be written between segments;
- everything else (TOP, messages not stored CRLF-clean, TLS) streams through
  the transform in bounded chunks (``MessageStream``).

The two streams run under flow control, so memory does not grow with
message size or with a slow reader.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from typing import TYPE_CHECKING

from fastpop.responses import END
from fastpop.stuffing import CHUNK, DotStuffer, TopLimiter, stuff_message

if TYPE_CHECKING:
    from fastpop.protocol import POP3Protocol

log = logging.getLogger("fastpop.send")

# Messages up to this size go out in a single write.
SMALL_MESSAGE = 128 * 1024
# CRLF-clean messages above this size go out with sendfile(2).
SENDFILE_MIN = SMALL_MESSAGE


def render_small(data: bytes, top_lines: int | None) -> bytes:
    """The transformed body of a whole message (no status line, no terminator)."""
    if top_lines is None:
        return stuff_message(data)
    stuffer, limiter = DotStuffer(), TopLimiter(top_lines)
    out = limiter.feed(stuffer.feed(data))
    if not limiter.done:
        out += limiter.feed(stuffer.finish())
    return out


class MessageStream:
    """Streams one large message; the protocol calls pump() when it may write."""

    __slots__ = ("_proto", "_file", "_stuffer", "_limiter", "sent")

    def __init__(self, proto: POP3Protocol, file, top_lines: int | None) -> None:
        self._proto = proto
        self._file = file
        self._stuffer = DotStuffer()
        self._limiter = None if top_lines is None else TopLimiter(top_lines)
        self.sent = 0

    def pump(self) -> None:
        proto = self._proto
        transport = proto.transport
        stuffer, limiter = self._stuffer, self._limiter
        while not proto.writing_paused:
            proto.touch()
            try:
                chunk = self._file.read(CHUNK)
            except OSError as exc:
                # The status line is out; the only honest end is to drop the connection.
                log.error("read error during RETR, closing connection: %s", exc)
                self.close()
                proto.abort_stream()
                return
            if chunk:
                out = stuffer.feed(chunk)
                if limiter is not None:
                    out = limiter.feed(out)
                    if limiter.done:
                        self._finish(out)
                        return
            else:
                out = stuffer.finish()
                if limiter is not None:
                    out = limiter.feed(out)
                self._finish(out)
                return
            if out:
                self.sent += len(out)
                transport.write(out)

    def _finish(self, tail: bytes) -> None:
        self.sent += len(tail)
        self._proto.transport.write(tail + END)
        self.close()
        self._proto.stream_done(self.sent)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


SCAN_WINDOW = 16 * 1024 * 1024  # a multiple of mmap.ALLOCATIONGRANULARITY


def dot_line_offsets(fd: int, size: int) -> list[int] | None:
    """Offsets of every "." that starts a line of the file (they need stuffing),
    or None if the file does not end with CRLF (it then needs the transform).

    The file is scanned through read-only mappings, a window at a time, so
    nothing is copied into user space and a huge file does not inflate RSS.
    """
    if size < 2 or os.pread(fd, 2, size - 2) != b"\r\n":
        return None
    offsets: list[int] = []
    pos = 0
    after_lf = True  # the start of the file is the start of a line
    while pos < size:
        length = min(SCAN_WINDOW, size - pos)
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=pos) as mm:
            if after_lf and mm[0] == 46:
                offsets.append(pos)
            i = mm.find(b"\n.")
            while i >= 0:
                offsets.append(pos + i + 1)
                i = mm.find(b"\n.", i + 2)
            after_lf = mm[length - 1] == 10
        pos += length
    return offsets


class SendfileStream:
    """Sends a CRLF-clean message file with sendfile(2), dot-stuffing as it goes.

    Bytes must reach the socket in order, and the transport owns the socket:
    so the stream first waits until the transport's buffer is empty (write
    limits of zero make resume_writing fire exactly then), then sends on a
    dup() of the socket — uvloop refuses add_writer on a descriptor its
    transport owns, not on a duplicate — waiting for writability on that
    duplicate.  The protocol does not touch the transport until done()
    (pipelined commands wait in the parser), and the terminator goes through
    the transport afterwards, behind every sent byte.
    """

    __slots__ = ("_proto", "_loop", "_fd", "_size", "_dots", "_next_dot", "_need_dot",
                 "_offset", "_sock", "_limits", "_waiting", "sent")

    def __init__(self, proto: POP3Protocol, fd: int, size: int, dots: list[int]) -> None:
        self._proto = proto
        self._loop = proto.loop
        self._fd = fd
        self._size = size
        self._dots = dots
        self._next_dot = 0
        self._need_dot = False
        self._offset = 0
        self._sock: socket.socket | None = None
        self._limits: tuple[int, int] | None = None
        self._waiting = False
        self.sent = 0

    def pump(self) -> None:
        """Start or continue; called by the protocol and on resume_writing."""
        if self._sock is None:
            if not self._take_socket():
                return
        if not self._waiting:
            self._send()

    def _take_socket(self) -> bool:
        transport = self._proto.transport
        if transport.get_write_buffer_size():
            if self._limits is None:
                self._limits = transport.get_write_buffer_limits()
                transport.set_write_buffer_limits(high=0, low=0)
            return False  # resume_writing will call pump() once the buffer is empty
        if self._limits is not None:
            low, high = self._limits
            transport.set_write_buffer_limits(high=high, low=low)
            self._limits = None
        raw = transport.get_extra_info("socket")
        self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        return True

    def _send(self) -> None:
        sock, fd, dots = self._sock, self._fd, self._dots
        assert sock is not None
        out = sock.fileno()
        try:
            while True:
                if self._need_dot:
                    if sock.send(b".", socket.MSG_MORE) != 1:
                        raise BlockingIOError
                    self._need_dot = False
                    self.sent += 1
                if self._next_dot < len(dots) and dots[self._next_dot] == self._offset:
                    self._next_dot += 1
                    self._need_dot = True
                    continue
                end = dots[self._next_dot] if self._next_dot < len(dots) else self._size
                if self._offset >= end:
                    break
                n = os.sendfile(out, fd, self._offset, end - self._offset)
                if n == 0:
                    raise OSError("message file shrank during RETR")
                self._offset += n
                self.sent += n
                self._proto.touch()
        except BlockingIOError:
            self._waiting = True
            self._loop.add_writer(out, self._writable)
            return
        except OSError as exc:
            log.warning("sendfile failed, closing connection: %s", exc)
            self.close()
            self._proto.abort_stream()
            return
        self.close()
        self._proto.transport.write(END)
        self._proto.stream_done(self.sent)

    def _writable(self) -> None:
        self._waiting = False
        if self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())
            self._send()

    def close(self) -> None:
        if self._sock is not None:
            if self._waiting:
                self._loop.remove_writer(self._sock.fileno())
                self._waiting = False
            self._sock.close()
            self._sock = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
