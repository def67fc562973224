"""Pure-Python twin of ``fastpop.bench._trivial``: the trivial POP3 responder's epoll engine.

Same constructor, same replies byte for byte, same framing and connection
handling as the compiled engine (``fastpop._compiled`` picks one;
``trivial.serve_epoll`` runs it): one epoll loop over non-blocking sockets,
no asyncio.  One command is answered at a time: while a reply is still being
sent, the connection's input waits.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastpop.bench.trivial import TrivialState

IN_SIZE = 1024  # a command line longer than this closes the connection
MAX_EVENTS = 256

OK = b"+OK\r\n"
BYE = b"+OK bye\r\n"
GREETING = b"+OK trivial ready\r\n"
NO_SUCH = b"-ERR no such message\r\n"

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class _Conn:
    __slots__ = ("closing", "inbuf", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out: memoryview | None = None  # the rest of the reply being sent
        self.closing = False  # close once ``out`` is sent (after QUIT)
        self.inbuf = bytearray()  # unanswered input, at most IN_SIZE octets


class TrivialEngine:
    """Serves one listening socket until a signal handler raises."""

    def __init__(self, listen_fd: int, wakeup_fd: int, state: TrivialState, capa: bytes, max_fd: int = 65536) -> None:
        """``state`` is a ``trivial.TrivialState``; ``listen_fd`` a non-blocking listening
        socket; ``wakeup_fd`` the read end of the non-blocking pair given to
        ``signal.set_wakeup_fd``, so that a signal wakes the loop wherever it lands."""
        self._conns: dict[int, _Conn] = {}
        self._epoll: select.epoll | None = None
        self._listen_fd = listen_fd
        self._wakeup_fd = wakeup_fd
        self._max_fd = max_fd
        self._accepting = True  # False while out of descriptors
        self._resume_at = 0  # then: when to try again (whole seconds, as time(2))
        # the replies as they are now: later changes to ``state`` are not seen
        self._retr = list(state.retr)
        self._corrupted = list(state.corrupted)
        self._corrupt = state.corrupt
        self._retr_count = 0  # the engine's own, over all connections
        self._fixed = {b"STAT": state.stat, b"UIDL": state.uidl, b"LIST": state.list, b"CAPA": capa}
        # a view of the caller's socket to accept on; it stays the caller's to close
        self._listener = socket.socket(fileno=listen_fd)
        self._listener.setblocking(False)  # no timeout even if a default one is set

    def __del__(self) -> None:
        # as the compiled engine's deallocation: its connections and epoll set go with it
        for c in getattr(self, "_conns", {}).values():
            c.sock.close()
        epoll = getattr(self, "_epoll", None)
        if epoll is not None:
            epoll.close()
        if getattr(self, "_listener", None) is not None:
            self._listener.detach()

    def serve(self) -> None:
        """Runs the loop; returns only by an exception (a signal handler's, or OSError)."""
        self._epoll = select.epoll()
        self._epoll.register(self._listen_fd, EPOLLIN)
        self._epoll.register(self._wakeup_fd, EPOLLIN)
        while True:
            # Out of descriptors, the listening socket (level-triggered) is left out of
            # the set for a while rather than spun on.  Signal handlers run in here (a
            # poll interrupted retries after them); their exception ends the loop.
            events = self._epoll.poll(-1 if self._accepting else 0.1, MAX_EVENTS)
            if not self._accepting and int(time.time()) >= self._resume_at:
                self._accepting = True
                self._epoll.register(self._listen_fd, EPOLLIN)
            for fd, mask in events:
                if fd == self._listen_fd:
                    self._accept()
                elif fd == self._wakeup_fd:
                    self._drain_wakeup()
                elif mask & EPOLLOUT:
                    self._flush(fd)
                else:
                    self._readable(fd)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_fd, 64):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _modify(self, fd: int, events: int) -> None:
        # as in the compiled engine a failure is ignored (the descriptor is in the set)
        assert self._epoll is not None, "called from serve(), which made it"
        try:
            self._epoll.modify(fd, events)
        except OSError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:  # BlockingIOError: none left to accept
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    assert self._epoll is not None, "called from serve(), which made it"
                    self._accepting = False
                    self._resume_at = int(time.time()) + 1
                    try:
                        self._epoll.unregister(self._listen_fd)
                    except OSError:
                        pass
                return
            fd = sock.fileno()
            if fd >= self._max_fd:
                sock.close()
                continue
            sock.setblocking(False)  # accept() gives a blocking socket
            c = self._conns[fd] = _Conn(sock)
            assert self._epoll is not None, "called from serve(), which made it"
            try:
                self._epoll.register(fd, EPOLLIN)
            except OSError:
                self._close(fd)
                continue
            self._send(fd, c, GREETING)

    def _close(self, fd: int) -> None:
        self._conns.pop(fd).sock.close()  # also takes it out of the epoll set

    def _send(self, fd: int, c: _Conn, data: bytes | memoryview) -> bool:
        """Sends a reply; what the socket does not take waits for EPOLLOUT.  False if fd was closed."""
        try:
            sent = c.sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(fd)
            return False
        if sent == len(data):
            if c.closing:
                self._close(fd)
                return False
            return True
        c.out = memoryview(data)[sent:]
        self._modify(fd, EPOLLOUT)
        return True

    def _flush(self, fd: int) -> None:
        c = self._conns.get(fd)
        if c is None:
            return
        data, c.out = c.out, None
        assert data is not None, "EPOLLOUT is asked for only while a reply is pending"
        self._modify(fd, EPOLLIN)
        if self._send(fd, c, data):
            self._answer(fd, c)  # commands that arrived while the reply was going out

    def _readable(self, fd: int) -> None:
        c = self._conns.get(fd)
        if c is None:
            return
        try:
            # (with inbuf full, as when an error comes while a reply is pending: 0 octets, closed)
            data = c.sock.recv(IN_SIZE - len(c.inbuf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        c.inbuf += data
        self._answer(fd, c)

    def _answer(self, fd: int, c: _Conn) -> None:
        """Answers the complete command lines in c.inbuf, one at a time."""
        inbuf = c.inbuf
        while c.out is None:
            lf = inbuf.find(b"\n")
            if lf < 0:
                if len(inbuf) == IN_SIZE:
                    self._close(fd)
                return
            end = lf - 1 if lf and inbuf[lf - 1] == 13 else lf
            line = bytes(inbuf[:end])
            del inbuf[: lf + 1]
            word = line[:4].upper()  # as the compiled engine's: ASCII letters only
            if word == b"RETR":
                # digits only from the sixth octet on (the fifth is not looked at)
                arg = line[5:]
                k = int(arg) if arg.isdigit() else 0
                if 1 <= k <= len(self._retr):
                    self._retr_count += 1
                    corrupt = self._corrupt and self._retr_count % self._corrupt == 0
                    reply = self._corrupted[k - 1] if corrupt else self._retr[k - 1]
                else:
                    reply = NO_SUCH
            elif word == b"QUIT":
                reply = BYE
                c.closing = True
            else:  # USER, PASS, AUTH, DELE, NOOP, RSET, anything else: all fine
                reply = self._fixed.get(word, OK)
            if not self._send(fd, c, reply):
                return
