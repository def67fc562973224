"""Where message bytes reach the socket: RETR and TOP responses.

Three paths, chosen by the protocol:

- small messages are read whole, transformed and queued as one write
  together with the status line and terminator;
- larger messages stored with CRLF line ends go out with sendfile(2)
  (``SendfileStream``): in one piece when the index says no line starts
  with "." (fastpop.store.index.FLAG_NO_DOT_LINES), else split at such lines
  so the stuffing dot can be written between segments;
- everything else (TOP, messages not stored CRLF-clean, TLS) streams through
  the transform in bounded chunks (``MessageStream``).

The two streams run under flow control, so memory does not grow with
message size or with a slow reader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Protocol

from fastpop.wire.responses import END
from fastpop.wire.stuffing import (
    CHUNK,
    DotStuffer,
    TopLimiter,
    line_dots,
    stuff_message,
)


class Session(Protocol):
    """What a stream needs from the session it sends for (fastpop.session.protocol.POP3Protocol)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    @property
    def writing_paused(self) -> bool: ...
    def touch(self) -> None: ...
    def stream_done(self, sent: int) -> None: ...
    def abort_stream(self) -> None: ...

log = logging.getLogger("fastpop.send")

# Messages up to this size go out in a single write.
SMALL_MESSAGE = 128 * 1024
# CRLF-clean messages above this size go out with sendfile(2) ...
SENDFILE_MIN = SMALL_MESSAGE
# ... unless lines starting with "." are so dense that the two system calls
# per dot cost more than copying through the transform (measured: a message
# whose every line starts with "." went 10x slower through sendfile).
MIN_BYTES_PER_DOT = 32 * 1024
# A stream whose reader keeps up transforms at most one chunk per turn of the
# event loop, then lets the other sessions run.
PUMP_BUDGET = CHUNK


# Client workarounds (Dovecot's pop3_client_workarounds; [pop3] client_workarounds):
NO_NULS = 1  # outlook-no-nuls: every NUL octet of RETR and TOP goes out as 0x80
ADD_EOH = 2  # oe-ns-eoh: TOP of a message without an empty line ends its header with one


def workaround_flags(names: list[str]) -> int:
    """The flags of the configured workarounds' names (validated by fastpop.config)."""
    return (NO_NULS if "outlook-no-nuls" in names else 0) | (ADD_EOH if "oe-ns-eoh" in names else 0)


def render_small(data: bytes, top_lines: int | None, workarounds: int = 0) -> bytes:
    """The transformed body of a whole message (no status line, no terminator)."""
    if top_lines is None:
        out = stuff_message(data)
    else:
        stuffer, limiter = DotStuffer(), TopLimiter(top_lines)
        out = limiter.feed(stuffer.feed(data))
        if not limiter.done:
            out += limiter.feed(stuffer.finish())
        if workarounds & ADD_EOH and limiter.in_headers:
            out += b"\r\n"
    if workarounds & NO_NULS:
        out = out.replace(b"\0", b"\x80")  # (same length: the RETR size stays right)
    return out


def has_nul(fd: int, size: int) -> bool:
    """Whether the first ``size`` octets of an open file hold a NUL, read with
    pread through one bounded buffer (the offset is left where it was).  It
    reads the whole file, which its user can make huge: never in the event loop."""
    buf = bytearray(min(SCAN_WINDOW, max(size, 1)))
    view = memoryview(buf)
    offset = 0
    while offset < size:
        n = os.preadv(fd, [view[: min(len(buf), size - offset)]], offset)
        if n == 0:
            break
        if buf.find(0, 0, n) >= 0:
            return True
        offset += n
    return False


class MessageStream:
    """Streams one large message; the protocol calls pump() when it may write."""

    __slots__ = ("_proto", "_file", "_stuffer", "_limiter", "_workarounds", "sent")

    def __init__(self, proto: Session, file, top_lines: int | None, workarounds: int = 0) -> None:
        self._proto = proto
        self._file = file
        self._stuffer = DotStuffer()
        self._limiter = None if top_lines is None else TopLimiter(top_lines)
        self._workarounds = workarounds
        self.sent = 0

    def pump(self) -> None:
        if self._file is None:
            return  # finished or closed before a scheduled turn came
        proto = self._proto
        transport = proto.transport
        stuffer, limiter = self._stuffer, self._limiter
        budget = PUMP_BUDGET
        while not proto.writing_paused:
            if budget <= 0:
                proto.loop.call_soon(self.pump)
                return
            budget -= CHUNK
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
                if self._workarounds & NO_NULS:
                    out = out.replace(b"\0", b"\x80")
                self.sent += len(out)
                transport.write(out)

    def _finish(self, tail: bytes) -> None:
        workarounds = self._workarounds
        if workarounds:
            limiter = self._limiter
            if workarounds & ADD_EOH and limiter is not None and limiter.in_headers:
                tail += b"\r\n"
            if workarounds & NO_NULS:
                tail = tail.replace(b"\0", b"\x80")
        self.sent += len(tail)
        self._proto.transport.write(tail + END)
        self.close()
        self._proto.stream_done(self.sent)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# Dot lines are looked for a window at a time: small enough that scanning one
# never leaves the socket idle, and scanned ahead while the socket is full, up
# to SCAN_AHEAD bytes.
SCAN_WINDOW = 1024 * 1024
SCAN_AHEAD = 8 * SCAN_WINDOW
# At most this much per sendfile call: measured on loopback, asking for the
# whole rest of a 100 MB message at once (the non-blocking socket takes what
# fits) was slower than asking a MiB at a time (median of each round's ratio
# to a bare blocking sendfile, six runs of 60 rounds: 0.87 against 0.95).
SENDFILE_CHUNK = 1024 * 1024
# At most this much per turn of the event loop, then the other sessions run:
# a reader that keeps up (loopback, a fast LAN) had a 1 GiB RETR hold the
# loop for 0.2 s, every other session of the worker waiting.
SENDFILE_TURN = 4 * SENDFILE_CHUNK
# Once a window of the file has lines starting with "." closer together than
# MIN_BYTES_PER_DOT, the rest of the message goes out as a copy, read COPY_CHUNK
# at a time and stuffed in memory, at most PUMP_BUDGET of it per turn (what the
# transform does): a dot line each sent by a sendfile(2) of its own costs two
# system calls, and with only octets counted against SENDFILE_TURN a message
# whose first window was plain and the rest ".\r\n" lines (anyone can mail one;
# it is CRLF-clean once delivered) made millions of them in one turn, every
# other session of the worker waiting seconds.
COPY_CHUNK = 64 * 1024


def may_sendfile(size: int, top_lines: int | None, stored_as_sent: bool) -> bool:
    """Whether open_stream would consider sendfile(2) for this message."""
    return top_lines is None and stored_as_sent and size >= SENDFILE_MIN


def open_stream(proto: Session, fd: int, size: int, top_lines: int | None, stored_as_sent: bool,
                no_dot_lines: bool = False, workarounds: int = 0, nul_free: bool = False):
    """The stream for a large message: sendfile(2) when the file is stored
    exactly as RETR sends it (CRLF line ends and a final CRLF) and the
    connection allows it; else the transform.  ``no_dot_lines``: the index
    says no line of the file starts with "." (then nothing is scanned).
    ``workarounds``: NO_NULS and ADD_EOH; with NO_NULS only a file known to
    hold no NUL (``nul_free``: has_nul, which the caller runs in a thread)
    may go by sendfile, which cannot change a byte.  Takes ownership of ``fd``."""
    if (may_sendfile(size, top_lines, stored_as_sent) and crlf_terminated(fd, size)
            and not (workarounds & NO_NULS and not nul_free)):
        stream = SendfileStream(proto, fd, size, no_dot_lines)
        if no_dot_lines or stream.dots_are_sparse():
            return stream
        stream.release_file()
    return MessageStream(proto, open(fd, "rb", buffering=0), top_lines, workarounds)


def crlf_terminated(fd: int, size: int) -> bool:
    """Whether the file ends with CRLF (else RETR must add one: the transform)."""
    return size >= 2 and os.pread(fd, 2, size - 2) == b"\r\n"


class SendfileStream:
    """Sends a CRLF-clean message file with sendfile(2), dot-stuffing as it goes.

    A message the index knows has no line starting with "." goes out by
    sendfile alone, no byte of it read here.  Otherwise such lines are found a
    window at a time, read with pread into one buffer per stream (RSS does not
    grow with file size) and searched by the compiled ``line_dots`` (SSE2, 64
    octets a turn), just ahead of the send offset, or further ahead while the
    socket is full; sendfile sends the segments between them and a "." is written
    before each.  Once a window has them dense (more than one per
    MIN_BYTES_PER_DOT), the rest of the file goes out from copies stuffed in
    memory instead, at the transform's pace per turn (COPY_CHUNK).  Read, not
    mapped: the message file belongs to its user, who could truncate it under
    a mapping, and SIGBUS would end every session of the worker; the copy
    into a buffer that stays in cache costs about 4 ms per 100 MB here.

    Bytes must reach the socket in order, and the transport owns the socket:
    so the stream first waits until the transport's buffer is empty (write
    limits of zero make resume_writing fire exactly then), then sends on a
    dup() of the socket — uvloop refuses add_writer on a descriptor its
    transport owns, not on a duplicate — waiting for writability on that
    duplicate.  The protocol does not touch the transport until done
    (pipelined commands wait in the parser), and the terminator goes through
    the transport afterwards, behind every sent byte.
    """

    __slots__ = ("_proto", "_loop", "_fd", "_size", "_dots", "_next_dot", "_need_dot", "_scanned",
                 "_after_lf", "_offset", "_sock", "_limits", "_waiting", "_buf", "_copying", "_pending",
                 "_dot_sent_at", "sent")

    def __init__(self, proto: Session, fd: int, size: int, no_dot_lines: bool = False) -> None:
        self._proto = proto
        self._loop = proto.loop
        self._fd = fd
        self._size = size
        self._dots: list[int] = []
        self._next_dot = 0
        self._need_dot = False
        self._scanned = size if no_dot_lines else 0  # (nothing to look for)
        self._copying = False  # a window had dense dot lines: the rest goes from copies (_copy_stuffed)
        self._pending: memoryview | None = None  # a stuffed copy not yet all sent
        self._dot_sent_at = -1  # the offset whose stuffing "." went out last (its line's "." may not have)
        self._after_lf = True  # the start of the file is the start of a line
        self._offset = 0
        self._sock: socket.socket | None = None
        self._limits: tuple[int, int] | None = None
        self._waiting = False
        self._buf: bytearray | None = None  # the scan window
        self.sent = 0

    def pump(self) -> None:
        """Start or continue; called by the protocol and on resume_writing."""
        if self._sock is None:
            if not self._take_socket():
                return
        if not self._waiting:
            self._send()

    def dots_are_sparse(self) -> bool:
        """Judged on the first window: is sendfile worth it for this message?"""
        self._scan_next_window()
        return not self._copying

    def release_file(self) -> None:
        """Give up the stream before it started, leaving the file open."""
        self._fd = -1

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

    def _scan_next_window(self) -> None:
        pos = self._scanned
        length = min(SCAN_WINDOW, self._size - pos)
        if self._next_dot:
            del self._dots[: self._next_dot]
            self._next_dot = 0
        buf = self._buf
        if buf is None or len(buf) != length:
            buf = self._buf = bytearray(length)  # one per stream (a shorter one for the last window)
        if os.preadv(self._fd, [buf], pos) != length:
            raise OSError("message file shrank during RETR")
        found = len(self._dots)
        # (no more than make the window dense: a dense window's positions are not used)
        self._after_lf = line_dots(buf, pos, self._after_lf, self._dots, length // MIN_BYTES_PER_DOT + 1)
        self._scanned = pos + length
        if (len(self._dots) - found) * MIN_BYTES_PER_DOT > length:
            self._copying = True  # dense: no more sendfile per dot line, nor their positions kept
            self._dots.clear()
            self._next_dot = 0

    def _send(self) -> None:
        sock, fd, dots, size = self._sock, self._fd, self._dots, self._size
        assert sock is not None
        out = sock.fileno()
        budget = SENDFILE_TURN
        try:
            while True:
                pending = self._pending
                if pending is not None:
                    n = sock.send(pending)
                    self.sent += n
                    self._proto.touch()
                    if n < len(pending):
                        self._pending = pending[n:]
                        raise BlockingIOError
                    self._pending = None
                if self._copying:
                    if self._offset >= size:
                        break
                    if budget <= 0:
                        if not self._waiting:
                            self._waiting = True
                            self._loop.add_writer(out, self._send)
                        return
                    budget -= self._copy_stuffed() * (SENDFILE_TURN // PUMP_BUDGET)
                    continue
                if self._need_dot:
                    if sock.send(b".", socket.MSG_MORE) != 1:
                        raise BlockingIOError
                    self._need_dot = False
                    self._dot_sent_at = self._offset
                    self.sent += 1
                if self._next_dot < len(dots):
                    end = dots[self._next_dot]
                    if end == self._offset:
                        self._next_dot += 1
                        self._need_dot = True
                        continue
                elif self._offset >= self._scanned and self._scanned < size:
                    self._scan_next_window()
                    continue
                else:
                    end = self._scanned
                if self._offset >= end:
                    break
                if budget <= 0:  # this turn's share sent: go on when the loop next finds the socket writable
                    if not self._waiting:
                        self._waiting = True
                        self._loop.add_writer(out, self._send)
                    return
                n = os.sendfile(out, fd, self._offset, min(end - self._offset, SENDFILE_CHUNK))
                if n == 0:
                    raise OSError("message file shrank during RETR")
                self._offset += n
                self.sent += n
                budget -= n
                self._proto.touch()
        except BlockingIOError:
            if not self._waiting:
                self._waiting = True
                self._loop.add_writer(out, self._send)
            # The socket is full: use the wait to look for dot lines ahead.
            if not self._copying and self._scanned < size and self._scanned - self._offset < SCAN_AHEAD:
                try:
                    self._scan_next_window()
                except (OSError, ValueError) as exc:
                    log.warning("cannot scan message during RETR, closing connection: %s", exc)
                    self.close()
                    self._proto.abort_stream()
            return
        except (OSError, ValueError) as exc:
            log.warning("sendfile failed, closing connection: %s", exc)
            self.close()
            self._proto.abort_stream()
            return
        self.close()
        self._proto.transport.write(END)
        self._proto.stream_done(self.sent)

    def _copy_stuffed(self) -> int:
        """The next COPY_CHUNK of the file (or what is left), stuffed in memory,
        as the pending output; returns how many octets of the file it took.
        The file is CRLF-clean, so stuffing is a "." before each "." that
        follows a LF: the octet before the copy is read with it, so one at its
        start is found too (and a "." owed there, _need_dot, is that one; one
        already sent there, _dot_sent_at, is not sent again)."""
        start = self._offset
        stop = min(self._size, start + COPY_CHUNK)
        data = os.pread(self._fd, stop - start + 1, start - 1) if start else b"\n" + os.pread(self._fd, stop, 0)
        if len(data) != stop - start + 1:
            raise OSError("message file shrank during RETR")
        if start == self._dot_sent_at:
            # The socket filled between the stuffing "." of the line starting here and
            # the line itself, and the switch to copies came in that wait: stuffed once.
            data = b"\0" + data[1:]
        self._pending = memoryview(data.replace(b"\n.", b"\n..")[1:])
        self._need_dot = False
        self._offset = stop
        return stop - start

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
