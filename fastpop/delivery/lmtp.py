"""The LMTP listener (RFC 2033): mail in from Postfix's ``lmtp:`` transport,
Dovecot's imaptest, or anything else that speaks LMTP.

A small server of fastpop's own, an ``asyncio.Protocol`` on the event loop
that also serves POP3, so nothing it does may hold that loop for long:

- Commands: LHLO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, HELP; VRFY and EXPN are
  refused; HELO and EHLO are not LMTP.  Extensions: PIPELINING, SIZE,
  8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES.  Command lines are at most
  ``MAX_LINE`` octets; replies to pipelined commands go out in one write, and
  while the client does not read them no further command is read.
- DATA is read in whatever pieces arrive: ``DotReader`` looks for the
  CRLF "." CRLF that ends it with ``bytes.find`` (never byte by byte), keeps
  the pieces, and the message is put together and dot-unstuffed in one pass,
  in a store thread.  Above ``MAX_MESSAGE_SIZE`` the rest is read and dropped.
- After the final "." every accepted recipient gets its own reply, in RCPT
  order (RFC 2033 4.2), also when the message is refused as a whole (too big).
- RCPT is checked against the user database (550 5.1.1 for an unknown user,
  451 4.3.0 while the database cannot be read); past ``[lmtp]
  max_recipients`` accepted ones a transaction gets 452 4.5.3 (RFC 5321
  4.5.3.1.10: the client sends the rest later).
- Connections: at most ``[lmtp] max_connections``, and never more than half
  of what the server's connection budget allows (``[server]
  max_connections``, the descriptors), so idle LMTP clients cannot starve
  POP3; LMTP connections count in ``max_connections``.  One idle for
  ``[lmtp] timeout`` seconds is closed with 421 4.4.2; in DATA each octet
  counts for 1/MIN_DATA_RATE of a second (Postfix's smtpd_min_data_rate),
  so one that trickles a message is closed the same way.

Storing runs in a thread pool so file writes and fsync never stall the event
loop (``fastpop.delivery.local`` does the work).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from fastpop import __version__
from fastpop.auth.authenticator import Authenticator, AuthUnavailable
from fastpop.config import Config
from fastpop.delivery.lmtp_data import Budget, DotReader
from fastpop.delivery.local import (
    FULL,
    DeliveryError,
    Recipient,
    resolve_async,
    store_normalized,
)
from fastpop.limits import ConnectionTable
from fastpop.net import parse_address
from fastpop.store.safefs import served_uid

log = logging.getLogger("fastpop.lmtp")

MAX_MESSAGE_SIZE = 64 << 20  # octets of DATA accepted (advertised as SIZE)
MIN_DATA_RATE = 500  # octets per second DATA must keep up, on average (Postfix's smtpd_min_data_rate default)
MAX_LINE = 2048  # a command line, CRLF included (RFC 5321 4.5.3.1.4: at least 512; Postfix's line_length_limit)
READ_PAUSE = 256 << 10  # input held while a command is answered: past this, reading pauses
STORE_THREADS = 4

SLICE = 1 << 20  # octets of a message unstuffed and normalised at once (_content)
# DATA octets all LMTP connections of a process may hold at once, read or being stored: past
# it a message is read and dropped and answered 452 4.3.1, else max_connections clients
# sending 64 MiB each (and its copies while stored) would take gigabytes.
DATA_BUDGET = 8 * MAX_MESSAGE_SIZE

# session states
COMMAND, DATA, CLOSED = 0, 1, 2


def parse_path(text: str) -> tuple[str, str] | None:
    """``<address> PARAMS`` (after FROM: or TO:) -> (address, params), None
    if malformed.  A source route (``<@a,@b:user@d>``) is dropped (RFC 5321
    4.1.1.3); an address without brackets is taken up to the first space."""
    text = text.lstrip(" ")
    if text.startswith("<"):
        if '"' not in text:
            close = text.find(">")
        else:  # a quoted local part may hold ">"
            close, quoted, i = -1, False, 1
            while i < len(text):
                c = text[i]
                if quoted and c == "\\":
                    i += 2
                    continue
                if c == '"':
                    quoted = not quoted
                elif c == ">" and not quoted:
                    close = i
                    break
                i += 1
        if close < 0:
            return None
        address, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(" "):
            return None
        if address.startswith("@"):
            _route, colon, address = address.partition(":")
            if not colon:
                return None
    else:
        address, _, rest = text.partition(" ")
    if any(c < " " or c == "\x7f" for c in address):
        return None
    return address, rest.strip(" ")


class LMTPSession(asyncio.Protocol):
    """One LMTP connection."""

    def __init__(self, service: LMTPService) -> None:
        self.service = service
        self.loop = service.loop
        self.transport: asyncio.Transport | None = None
        self.peer = "local"
        self._state = COMMAND
        self._buf = bytearray()  # command input not yet taken
        self._out: list[bytes] = []  # replies not yet written
        self._task: asyncio.Task | None = None  # a RCPT lookup or a delivery under way
        self._delivering = False
        self._write_paused = False
        self._reading_paused = False
        self._discarding = False  # inside a command line longer than MAX_LINE
        self._eof = False  # the client has shut its side down
        self._counted = False
        self._closing = False  # close once the delivery under way is answered (shutdown)
        self._lhlo = False
        self._sender: str | None = None  # MAIL FROM given ("" for the null sender)
        self._targets: list[Recipient] = []
        self._reader: DotReader | None = None
        self._errors = 0
        self._last = 0.0  # last activity (a command line, DATA octets, an answer)
        self._timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0])
        service = self.service
        refused = service.admit()
        if refused is not None:
            service.log_refused(refused, self.peer)
            transport.write(b"421 4.3.2 %s Too many connections, try again later\r\n" % service.hostname)  # type: ignore[attr-defined]
            self._state = CLOSED
            transport.close()
            return
        self._counted = True
        service.sessions.add(self)
        self._last = self.loop.time()
        self._timer = self.loop.call_at(self._last + service.settings().lmtp_timeout, self._on_timer)
        transport.write(service.greeting)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._state == CLOSED:
            return
        if self._state == DATA:
            # message octets buy time at MIN_DATA_RATE, never past now: a client trickling
            # a byte now and then is closed after [lmtp] timeout, as an idle one is
            self._last = min(self.loop.time(), self._last + len(data) / MIN_DATA_RATE)
            self._take_data(data)
            return
        if 10 in data:  # b"\n": a complete line is activity, a trickle of octets is not
            self._last = self.loop.time()
        self._buf += data
        self._process()

    def eof_received(self) -> bool | None:
        """The client will send nothing more: answer what it sent, then close
        (in the middle of a message: close now)."""
        self._eof = True
        if self._state == DATA:
            if self._reader is not None:
                self._reader.release()
            self._reader = None
            self._close()
            return None
        self._process()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = CLOSED
        if self._counted:
            self._counted = False
            self.service.release()
        self.service.sessions.discard(self)
        if self._reader is not None:  # gone in the middle of a message
            self._reader.release()
            self._reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()  # a store under way still finishes (StorePool)
        self.transport = None

    # ----------------------------------------------------------- input

    def _blocked(self) -> bool:
        return self._state != COMMAND or self._task is not None or self._write_paused

    def _process(self) -> None:
        """Answer the complete command lines in the buffer, in order, until
        one needs to wait (a lookup, a delivery, a client not reading)."""
        buf = self._buf
        pos = 0
        try:
            while not self._blocked():
                end = buf.find(b"\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_LINE:
                        self._discarding = True
                        pos = len(buf)
                    break
                if self._discarding or end + 1 - pos > MAX_LINE:
                    self._discarding = False
                    pos = end + 1
                    self._error("500 5.5.2 Error: line too long")
                    continue
                line = bytes(buf[pos:end])
                pos = end + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._command(line)
                if self._state == DATA:  # what is left is the message
                    rest = bytes(buf[pos:])
                    del buf[:]
                    pos = 0
                    self._take_data(rest)
                    break
        finally:
            del buf[:pos]
        if self._eof and not self._blocked():
            self._close()  # all answered
        self._flush()
        self._flow()

    def _flow(self) -> None:
        """Stop reading while commands wait and too much is held; go on after."""
        transport = self.transport
        if transport is None or self._state == CLOSED:
            return
        hold = len(self._buf) > READ_PAUSE and self._blocked()
        if hold != self._reading_paused:
            self._reading_paused = hold
            if hold:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _take_data(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        self._state = COMMAND
        self._buf += rest
        self._start(self._finish_data(reader))
        # also when the task is cancelled before it ever ran (the connection went at once)
        self._task.add_done_callback(lambda _task: reader.release())  # type: ignore[union-attr]
        self._flow()

    # ----------------------------------------------------------- output

    def _reply(self, text: str) -> None:
        self._out.append(text.encode("utf-8", "surrogateescape") + b"\r\n")

    def _flush(self) -> None:
        if self._out and self.transport is not None and self._state != CLOSED:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self) -> None:
        self._flush()
        self._state = CLOSED
        if self.transport is not None:
            self.transport.close()

    def _error(self, text: str) -> None:
        """A refused command line: too many in a connection and it is closed."""
        self._reply(text)
        self._errors += 1
        if self._errors >= self.service.settings().max_bad_commands:
            self._reply(f"421 4.7.0 {self.service.hostname.decode()} Error: too many errors")
            self._close()

    def _on_timer(self) -> None:
        self._timer = None
        if self._state == CLOSED:
            return
        timeout = self.service.settings().lmtp_timeout
        now = self.loop.time()
        if self._task is None and now - self._last >= timeout:
            log.info("lmtp rip=%s: idle for %g s, closed", self.peer, timeout)
            self._reply(f"421 4.4.2 {self.service.hostname.decode()} Error: timeout exceeded")
            stuck = self._write_paused  # it reads nothing either: do not wait for it
            self._close()
            if stuck and self.transport is not None:
                self.transport.abort()
            return
        self._timer = self.loop.call_at(max(now, self._last) + timeout, self._on_timer)

    # ----------------------------------------------------------- waiting work

    def _start(self, coro) -> None:
        self._task = asyncio.ensure_future(self._run(coro))

    async def _run(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer, log, go on
            log.error("lmtp: internal error: %s: %s", type(exc).__name__, exc)
            self._reply("451 4.3.0 Internal error")
        finally:
            self._task = None
        if self._state == CLOSED:
            return
        self._last = self.loop.time()
        if self._closing:
            self._close()
            return
        self._process()

    # ----------------------------------------------------------- commands

    def _command(self, line: bytes) -> None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error("500 5.5.2 Error: bad UTF-8 syntax")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        arg = arg.strip(" ")
        if verb == "RCPT":
            self.rcpt(arg)
        elif verb == "MAIL":
            self.mail(arg)
        elif verb == "DATA":
            self.data(arg)
        elif verb == "LHLO":
            self.lhlo(arg)
        elif verb == "RSET":
            if arg:
                self._error("501 5.5.4 Syntax: RSET")
                return
            self._reset()
            self._reply("250 2.0.0 Ok")
        elif verb == "NOOP":
            self._reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            self._close()
        elif verb in ("VRFY", "EXPN"):
            self._reply(f"502 5.5.1 {verb} command is disabled")
        elif verb == "HELP":
            self._reply("214 2.0.0 Commands: LHLO MAIL RCPT DATA RSET NOOP QUIT")
        elif verb in ("HELO", "EHLO"):
            self._error("500 5.5.1 Error: command not recognized (this is LMTP: LHLO)")
        else:
            self._error("500 5.5.2 Error: command not recognized")

    def _reset(self) -> None:
        self._sender = None
        self._targets = []

    def lhlo(self, arg: str) -> None:
        if not arg:
            self._error("501 5.5.4 Syntax: LHLO hostname")
            return
        self._reset()
        self._lhlo = True
        self._out.append(self.service.lhlo_reply)

    def mail(self, arg: str) -> None:
        if not self._lhlo:
            self._error("503 Error: send LHLO first")
            return
        if self._sender is not None:
            self._error("503 5.5.1 Error: nested MAIL command")
            return
        path = parse_path(arg[5:]) if arg[:5].upper() == "FROM:" else None
        if path is None:
            self._error("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        sender, params = path
        for param in params.split():
            key, eq, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and eq:
                if not (value.isascii() and value.isdigit()) or len(value) > 20:  # str.isdigit() takes "²"
                    self._error("501 5.5.4 Bad SIZE value")
                    return
                if int(value) > MAX_MESSAGE_SIZE:
                    self._reply("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == "BODY" and eq:
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._error("501 5.5.4 Bad BODY value")
                    return
            elif key == "SMTPUTF8" and not eq:
                pass
            else:
                self._error("555 5.5.4 Unsupported MAIL FROM parameter")
                return
        self._sender = sender
        self._reply("250 2.1.0 Ok")

    def rcpt(self, arg: str) -> None:
        if not self._lhlo:
            self._error("503 Error: send LHLO first")
            return
        if self._sender is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        path = parse_path(arg[3:]) if arg[:3].upper() == "TO:" else None
        if path is None:
            self._error("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, params = path
        if not address:
            self._error("501 5.1.3 Bad recipient address syntax")
            return
        if params:
            self._error("555 5.5.4 Unsupported RCPT TO parameter")
            return
        if len(self._targets) >= self.service.settings().lmtp_max_recipients:
            self._reply("452 4.5.3 Error: too many recipients")
            return
        self._start(self._rcpt(address))

    async def _rcpt(self, address: str) -> None:
        auth = self.service.auth
        try:
            recipient = await resolve_async(auth, address)
        except AuthUnavailable:
            self._reply(f"451 4.3.0 <{address}> Temporary user database failure, try again later")
            return
        except DeliveryError as exc:
            log.error("lmtp rcpt %s: %s", address, exc)
            self._reply(f"451 4.3.5 <{address}> Mail system configuration error")
            return
        if recipient is None:
            log.info("lmtp rcpt %s: no such user", address)
            self._reply(f"550 5.1.1 <{address}> User doesn't exist")
            return
        self._targets.append(recipient)
        self._reply(f"250 2.1.5 <{address}> Ok")

    def data(self, arg: str) -> None:
        if not self._lhlo:
            self._error("503 Error: send LHLO first")
            return
        if arg:
            self._error("501 5.5.4 Syntax: DATA")
            return
        if self._sender is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        if not self._targets:
            self._error("503 5.5.1 Error: need RCPT command")  # RFC 2033: 503, not 354
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._flush()
        self._reader = DotReader(MAX_MESSAGE_SIZE, self.service.budget)
        self._state = DATA

    async def _finish_data(self, reader: DotReader) -> None:
        targets, sender = self._targets, self._sender
        self._reset()
        self._delivering = True
        try:
            if reader.over_budget:
                log.warning("lmtp rip=%s: message refused: %d octets of DATA held by LMTP connections already",
                            self.peer, self.service.budget.used)
                replies = [f"452 4.3.1 <{t.address}> Insufficient system storage, try again later" for t in targets]
            elif reader.parts is None:
                log.info("lmtp rip=%s: message of %d octets refused (over %d)", self.peer, reader.size,
                         MAX_MESSAGE_SIZE)
                replies = [f"552 5.3.4 <{t.address}> Message too big for system" for t in targets]
            else:
                try:
                    replies = await self.service.deliver(targets, reader.parts, sender)
                except Exception as exc:  # a bug: every recipient is still answered
                    log.error("lmtp: internal error: %s: %s", type(exc).__name__, exc)
                    replies = [f"451 4.3.0 <{t.address}> Internal error" for t in targets]
        finally:
            reader.release()  # stored (or not): its octets and the copies made of them are gone
            self._delivering = False
        for reply in replies:
            self._reply(reply)


class StorePool:
    """Stores messages in a thread pool; ``fastpop.delivery.local`` does the work."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.executor = concurrent.futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="fastpop-store")
        self.pending: set[asyncio.Future] = set()

    async def store(self, recipient: Recipient, content: bytes) -> tuple[str, str]:
        fut = self.loop.run_in_executor(self.executor, _store, recipient, content)
        self.pending.add(fut)
        fut.add_done_callback(self.pending.discard)
        return await asyncio.shield(fut)  # a dropped connection must not hide the outcome

    async def close(self, timeout: float = 30.0) -> None:
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=timeout)
        self.executor.shutdown(wait=False)


def _store(recipient: Recipient, content: bytes) -> tuple[str, str]:
    """In a pool thread: the reply for one recipient, as (status codes, text)."""
    address = recipient.address
    try:
        stored = store_normalized(recipient.maildir, content, owner=served_uid(recipient.user.uid))
    except DeliveryError as exc:
        log.warning("lmtp to=<%s> user=%s failed: %s", address, recipient.user.name, exc)
        if exc.errno == errno.EDQUOT:  # the user's quota (maildirsize, or the file system's): RFC 3463 4.2.2
            return "452 4.2.2", "Mailbox full"
        if exc.errno in FULL:  # the disk: RFC 3463 4.3.1, the mail system is full
            return "452 4.3.1", "Insufficient system storage, try again later"
        return "451 4.3.0", "Temporary failure storing the message"
    except Exception as exc:  # a bug: the message must still be answered for
        log.error("lmtp to=<%s> user=%s failed: %s: %s", address, recipient.user.name, type(exc).__name__, exc)
        return "451 4.3.0", "Internal error"
    log.info("lmtp to=<%s> user=%s size=%d name=%s", address, recipient.user.name, stored.size, stored.name)
    return "250 2.0.0", f"Ok: stored as {stored.name.split(',', 1)[0]}"


def _content(parts: list[bytes]) -> bytes:
    """In a pool thread: the message as it is stored, ``normalize(DotReader.assemble(parts))``,
    worked out in slices of about ``SLICE`` octets: a bytes method holds the
    GIL until it returns, and the event loop serving POP3 waits for it.

    Each slice ends just before a CRLF, so neither a CRLF "." nor a line end
    spans two slices and each is dot-unstuffed and has its line ends made
    CRLF on its own (normalize()'s replacements); a slice already in CRLF
    form (the usual case) is left as it is.  The message ends in CRLF
    (DotReader), so there is no final CRLF to add.
    """
    data = b"".join(parts)  # begins with the CRLF DotReader put in front
    out = []
    start, end = 0, len(data)
    while start < end:
        cut = data.find(b"\r\n", start + SLICE) if end - start > SLICE else -1
        if cut < 0:
            cut = end
        piece = data[start:cut]
        if b"\r\n." in piece:
            piece = piece.replace(b"\r\n.", b"\r\n")
        if piece.count(b"\n") != piece.count(b"\r\n"):  # a bare LF: as normalize() does
            piece = piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out.append(piece)
        start = cut
    if not out:
        return b""
    out[0] = out[0][2:]
    return b"".join(out)


class LMTPService:
    """The LMTP listeners of one server, their connections and store threads.

    ``connections``: the server's ConnectionTable (LMTP connections count in
    its total); ``settings``: the configuration in force (it changes on
    SIGHUP), else ``config``."""

    def __init__(self, config: Config, auth: Authenticator, loop: asyncio.AbstractEventLoop,
                 connections: ConnectionTable | None = None, settings: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.settings = settings or (lambda: config)
        self.auth = auth
        self.loop = loop
        self.table = connections
        self.pool = StorePool(loop)
        self.budget = Budget(DATA_BUDGET)
        self.servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []
        self.sessions: set[LMTPSession] = set()
        self._unix_paths: list[tuple[str, int, int]] = []  # (path, st_dev, st_ino) to remove at close
        self._refused_logged = -1e9
        self.hostname = config.hostname.encode("utf-8", "replace")
        self.greeting = b"220 %s LMTP fastpop %s ready\r\n" % (self.hostname, __version__.encode())
        extensions = ["PIPELINING", f"SIZE {MAX_MESSAGE_SIZE}", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8"]
        lines = [self.hostname.decode(), *extensions]
        self.lhlo_reply = "".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
                                  for i, line in enumerate(lines)).encode()

    # -- connection limits

    def connection_cap(self) -> int:
        """LMTP connections allowed at once: ``[lmtp] max_connections``, and at
        most half the server's budget (max_connections, descriptors)."""
        cap = self.settings().lmtp_max_connections
        table = self.table
        if table is not None:
            cap = min(cap, max(1, table.per_worker // 2))
            if table.total:
                cap = min(cap, max(1, table.total // 2))
        return cap

    def admit(self) -> str | None:
        """Count a new connection; why it is refused (nothing counted), or None."""
        if len(self.sessions) >= self.connection_cap():
            return "lmtp"
        if self.table is not None:
            return self.table.acquire(None)  # the total only: LMTP is the MTA's, not per address
        return None

    def release(self) -> None:
        if self.table is not None:
            self.table.release(None)

    def log_refused(self, reason: str, peer: str) -> None:
        now = self.loop.time()
        if now - self._refused_logged >= 10.0:
            self._refused_logged = now
            limit = {"lmtp": "lmtp max_connections", "total": "max_connections"}.get(reason, "descriptor")
            log.warning("lmtp: refusing connections (rip=%s): %d LMTP connections open (%s limit)",
                        peer, len(self.sessions), limit)

    # -- delivery

    async def deliver(self, targets: list[Recipient], parts: list[bytes], sender: str | None) -> list[str]:
        """One reply per target, in order; a Maildir named twice is written once."""
        content = await self.loop.run_in_executor(self.pool.executor, _content, parts)
        by_maildir: dict[str, asyncio.Future] = {}
        for t in targets:
            if t.maildir not in by_maildir:
                by_maildir[t.maildir] = asyncio.ensure_future(self.pool.store(t, content))
        results = await asyncio.gather(*by_maildir.values())
        reply_for = dict(zip(by_maildir, results, strict=True))
        return [f"{reply_for[t.maildir][0]} <{t.address}> {reply_for[t.maildir][1]}" for t in targets]

    # -- listeners

    def _protocol(self) -> LMTPSession:
        return LMTPSession(self)

    async def start(self) -> None:
        for addr in self.config.lmtp_listen:
            if addr.startswith("unix:"):
                path = addr[len("unix:") :]
                _remove_stale_socket(path)
                server = await self.loop.create_unix_server(self._protocol, path, backlog=1024, start_serving=False)
                os.chmod(path, 0o666)  # who may connect is decided by the directory's permissions
                st = os.stat(path)
                self._unix_paths.append((path, st.st_dev, st.st_ino))
                self.addresses.append(addr)
            else:
                host, port = parse_address(addr)
                server = await self.loop.create_server(self._protocol, host, port, reuse_address=True, backlog=1024,
                                                       start_serving=False)
                for sock in server.sockets:
                    h, p = sock.getsockname()[:2]
                    self.addresses.append(f"[{h}]:{p}" if sock.family == socket.AF_INET6 else f"{h}:{p}")
            self.servers.append(server)

    async def start_serving(self) -> None:
        """Accept connections (bound by start(), before privileges were dropped)."""
        for server in self.servers:
            await server.start_serving()

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting; a delivery under way is answered (for up to
        ``timeout`` seconds), every other connection closes now."""
        for server in self.servers:
            server.close()
        delivering = []
        for session in list(self.sessions):
            if session._delivering and session._task is not None:
                session._closing = True
                delivering.append(session._task)
            elif session.transport is not None:
                if session._state == COMMAND and session._task is None:
                    session._reply(f"421 4.3.2 {self.hostname.decode()} Service shutting down")
                session._close()
        if delivering:
            await asyncio.wait(delivering, timeout=timeout)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        await self.pool.close(timeout)
        for path, dev, ino in self._unix_paths:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass


def _remove_stale_socket(path: str) -> None:
    """A socket left by a server that is gone is removed; a live one is an error."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # let the bind report it
    finally:
        probe.close()
    raise OSError(f"{path}: another server is listening there")


async def start(config: Config, auth: Authenticator, connections: ConnectionTable | None = None,
                settings: Callable[[], Config] | None = None) -> LMTPService:
    """Bind every LMTP listener of ``config.lmtp_listen`` (serving starts with
    ``start_serving``).  ``connections`` and ``settings``: see LMTPService."""
    service = LMTPService(config, auth, asyncio.get_running_loop(), connections, settings)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    return service
