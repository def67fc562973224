"""The LMTP listener (RFC 2033): mail in from Postfix's ``lmtp:`` transport,
Dovecot's imaptest, or anything else that speaks LMTP.

Built on aiosmtpd's ``LMTP`` class, which gives LHLO but answers DATA with a
single reply, as for SMTP (aiosmtpd issue #517).  ``FastpopLMTP`` replaces
DATA: after the final "." it answers once for every accepted RCPT, in RCPT
order, as section 4.2 requires, also when the message is refused as a whole
(too big).  RCPT is checked against the user database (550 5.1.1 for an
unknown user, 451 4.3.0 while the database cannot be read); storing runs in a
thread pool so file writes and fsync never stall the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import socket
import stat

from aiosmtpd.lmtp import LMTP

from fastpop import __version__
from fastpop.auth import AuthUnavailable, Authenticator
from fastpop.config import Config, parse_address
from fastpop.safefs import served_uid
from fastpop.delivery import FULL, DeliveryError, Recipient, normalize, resolve_async, store_normalized

log = logging.getLogger("fastpop.lmtp")

MAX_MESSAGE_SIZE = 64 << 20  # bytes of DATA accepted (advertised as SIZE)
READ_LIMIT = 64 << 10  # stream buffer: the longest piece read at once
STORE_THREADS = 4


class LMTPHandler:
    """aiosmtpd hooks: LHLO extensions, MAIL and RCPT; DATA is FastpopLMTP's."""

    def __init__(self, auth: Authenticator, store: StorePool) -> None:
        self.auth = auth
        self.store = store

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # LHLO
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        try:
            recipient = await resolve_async(self.auth, address)
        except AuthUnavailable:
            return f"451 4.3.0 <{address}> Temporary user database failure, try again later"
        except DeliveryError as exc:
            log.error("lmtp rcpt %s: %s", address, exc)
            return f"451 4.3.5 <{address}> Mail system configuration error"
        if recipient is None:
            log.info("lmtp rcpt %s: no such user", address)
            return f"550 5.1.1 <{address}> User doesn't exist"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        _targets(envelope).append(recipient)
        return f"250 2.1.5 <{address}> Ok"

    async def handle_RSET(self, server, session, envelope):
        return "250 2.0.0 Ok"

    async def handle_NOOP(self, server, session, envelope, arg):
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server, session, envelope):
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        log.error("lmtp: internal error: %s: %s", type(error).__name__, error)
        return "451 4.3.0 Internal error"


def _targets(envelope) -> list[Recipient]:
    targets = getattr(envelope, "fastpop_targets", None)
    if targets is None:
        targets = envelope.fastpop_targets = []
    return targets


class FastpopLMTP(LMTP):
    """aiosmtpd's LMTP with a DATA that answers once per recipient."""

    line_length_limit = READ_LIMIT  # sizes the StreamReader; DATA lines may be longer

    def __init__(self, handler: LMTPHandler, service: LMTPService, **kwargs) -> None:
        # aiosmtpd keeps these per class and grows them on every LHLO: keep ours apart
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        super().__init__(handler, **kwargs)
        self.service = service

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.service.connections.add(self)

    def connection_lost(self, error) -> None:
        self.service.connections.discard(self)
        super().connection_lost(error)

    async def check_helo_needed(self, helo: str = "LHLO") -> bool:
        return await super().check_helo_needed("LHLO")

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        targets = _targets(self.envelope)
        if not targets:
            await self.push("503 5.5.1 Error: need RCPT command")  # RFC 2033: 503, not 354
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        content = await self._read_data(limit)
        if content is None:
            replies = [f"552 5.3.4 <{t.address}> Message too big for system" for t in targets]
        else:
            replies = await self.service.deliver(targets, content, self.envelope.mail_from)
        self._set_post_data_state()
        for reply in replies:
            await self.push(reply)

    async def _read_data(self, limit: int | None) -> bytes | None:
        """The message up to the final ".", dot-transparency removed; None if
        it exceeded ``limit`` (the rest is read and discarded).

        Lines end in CRLF (RFC 5321 2.3.8; a bare LF is data).  Where a line
        may be starting, a "." may begin the terminator, so bytes are taken
        one at a time (and a line starting with "." whole); once inside a
        line, everything up to and including CRLF.CRLF comes in large pieces.
        """
        reader = self._reader
        parts: list[bytes] = []
        total = 0
        too_big = False

        def keep(piece: bytes) -> None:
            nonlocal total, too_big
            total += len(piece)
            if limit and total > limit + 5:  # + the terminator
                too_big = True
                parts.clear()
            if not too_big:
                parts.append(piece)

        LINE_START, AFTER_CR, INSIDE = 0, 1, 2
        state = LINE_START
        while True:
            if state == INSIDE:
                try:
                    piece = await reader.readuntil(b"\r\n.\r\n")
                except asyncio.LimitOverrunError as exc:
                    keep(await reader.readexactly(exc.consumed))  # never ends inside a terminator
                    continue
                keep(piece[:-3])  # all but ".\r\n"
                break
            byte = await reader.readexactly(1)
            if state == AFTER_CR:
                keep(byte)
                state = LINE_START if byte == b"\n" else AFTER_CR if byte == b"\r" else INSIDE
            elif byte == b"\r":
                keep(byte)
                state = AFTER_CR
            elif byte != b".":
                keep(byte)
                state = INSIDE
            else:
                try:
                    line = byte + await reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    keep(byte + await reader.readexactly(exc.consumed))
                    state = INSIDE  # inside a long line, not just before a CRLF.CRLF
                    continue
                if line == b".\r\n":
                    break
                keep(line)
        if too_big:
            return None
        data = b"".join(parts)
        if b"\r\n." in data or data.startswith(b"."):
            data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]
        return data


class StorePool:
    """Stores messages in a thread pool; ``fastpop.delivery`` does the work."""

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
        if exc.errno in FULL:
            return "452 4.2.2", "Mailbox full or disk full, try again later"
        return "451 4.3.0", "Temporary failure storing the message"
    except Exception as exc:  # a bug: the message must still be answered for
        log.error("lmtp to=<%s> user=%s failed: %s: %s", address, recipient.user.name, type(exc).__name__, exc)
        return "451 4.3.0", "Internal error"
    log.info("lmtp to=<%s> user=%s size=%d name=%s", address, recipient.user.name, stored.size, stored.name)
    return "250 2.0.0", f"Ok: stored as {stored.name.split(',', 1)[0]}"


class LMTPService:
    """The LMTP listeners of one server, their connections and store threads."""

    def __init__(self, config: Config, auth: Authenticator, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.pool = StorePool(loop)
        self.handler = LMTPHandler(auth, self.pool)
        self.servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []
        self.connections: set[FastpopLMTP] = set()
        self._unix_paths: list[tuple[str, int, int]] = []  # (path, st_dev, st_ino) to remove at close

    def _protocol(self) -> FastpopLMTP:
        return FastpopLMTP(
            self.handler,
            self,
            hostname=self.config.hostname,
            ident=f"fastpop {__version__} LMTP",
            data_size_limit=MAX_MESSAGE_SIZE,
            enable_SMTPUTF8=True,
            loop=self.loop,
        )

    async def deliver(self, targets: list[Recipient], content: bytes, sender: str | None) -> list[str]:
        """One reply per target, in order; a Maildir named twice is written once."""
        content = await self.loop.run_in_executor(self.pool.executor, normalize, content)
        by_maildir: dict[str, asyncio.Future] = {}
        for t in targets:
            if t.maildir not in by_maildir:
                by_maildir[t.maildir] = asyncio.ensure_future(self.pool.store(t, content))
        results = await asyncio.gather(*by_maildir.values())
        reply_for = dict(zip(by_maildir, results))
        return [f"{reply_for[t.maildir][0]} <{t.address}> {reply_for[t.maildir][1]}" for t in targets]

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

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self.pool.close()
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


async def start(config: Config, auth: Authenticator) -> LMTPService:
    """Open every LMTP listener of ``config.lmtp_listen``."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    service = LMTPService(config, auth, asyncio.get_running_loop())
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    return service
