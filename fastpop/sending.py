"""Where message bytes reach the socket: RETR and TOP responses.

Small messages are read whole, transformed and queued as one write together
with the status line and terminator.  Larger ones stream in bounded chunks
under the transport's flow control, so memory does not grow with message
size or with a slow reader.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastpop.responses import END
from fastpop.stuffing import CHUNK, DotStuffer, TopLimiter, stuff_message

if TYPE_CHECKING:
    from fastpop.protocol import POP3Protocol

log = logging.getLogger("fastpop.send")

# Messages up to this size go out in a single write.
SMALL_MESSAGE = 128 * 1024


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
