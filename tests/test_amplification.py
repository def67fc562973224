"""Reply amplification: a client that pipelines short commands and never reads
must not make the server hold their replies (issue #17, item 1).

``CAPA`` is 6 octets and its reply 186: pipelined 50,000 times (320 KiB) by a
client that never reads, the server used to answer every command it had read
in one go and keep the megabytes it could not send (1-4 MiB per connection
here, 8 through TLS; 50 connections per address).  Now every reply counts
against the output bound (``FLUSH_REPLIES`` pieces of replies or
``FLUSH_BYTES`` of messages and listings, then the transport's high-water
mark): the server stops reading the commands of a connection whose replies
are not read, and goes on, in order, when the client reads.

Each attack here: several connections pipeline a few hundred KiB of one
command and do not read; the server's RSS growth must stay a small fraction
of what was sent; then every client reads and must get every reply, byte
for byte and in order, and a clean QUIT.  Both parsers, uvloop and asyncio,
before and after login, over STLS and implicit TLS.  (What the kernel queues
for the socket is not counted: up to ``net.ipv4.tcp_wmem``, as before, as for
any TCP server.)
"""

from __future__ import annotations

import selectors
import socket
import ssl
import time

import pytest
from support.server import PARSERS, ServerProcess, message, serving
from test_hostile_clients import rss

pytestmark = pytest.mark.timeout(120)

FLOOD = 320 * 1024  # octets of pipelined commands per connection
CONNECTIONS = 12
# Server growth allowed per flooding connection: what it read and has not
# answered yet, its unsent replies (the transport's 64 KiB high-water mark and
# one write of at most 150 KiB), the allocator's slack.  Through TLS, records
# read and not yet decrypted, records not yet sent, the TLS read buffer.  The
# old code held 1-4 MiB (8 MiB through TLS); this one 0.05-0.2 (0.6).
PER_CONNECTION = 384 * 1024
PER_TLS_CONNECTION = 1536 * 1024
CLIENT_RCVBUF = 16 * 1024  # the attacker's receive buffer: what the kernel takes off the server's hands


def settled_rss(pid: int, timeout: float = 3.0) -> int:
    """The server's RSS once it stopped moving (it answered what it will)."""
    deadline = time.monotonic() + timeout
    last, still = rss(pid), 0
    while time.monotonic() < deadline and still < 3:
        time.sleep(0.1)
        now = rss(pid)
        still = still + 1 if now == last else 0
        last = now
    return last


VARIANTS = [(p, loop) for loop in ("uvloop", "asyncio") for p in PARSERS]


@pytest.fixture(params=VARIANTS, ids=[f"{p}-{loop}" for p, loop in VARIANTS])
def server(request, tmp_path):
    parser, loop = request.param
    yield from serving(ServerProcess(tmp_path, PARSERS[parser], loop=loop, extra_args=["--log-level", "info"]))


class Client:
    """A connection driven step by step: blocking for the setup, then
    non-blocking for the flood, so one thread drives them all."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connect: the window stays small and the kernel holds little for us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buf = bytearray()
        self.greeting = self.line()
        self.todo = memoryview(b"")
        self.expected = b""
        self.got = 0

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(bytes(self.buf))
            self.buf += chunk
        i = self.buf.index(b"\r\n") + 2
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def reply(self, command: bytes, multiline: bool) -> bytes:
        """Send one command and return its whole reply, as sent."""
        self.sock.sendall(command + b"\r\n")
        out = self.line()
        if multiline and out.startswith(b"+OK"):
            while True:
                line = self.line()
                out += line
                if line == b".\r\n":
                    break
        return out

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.reply(b"STLS", False).startswith(b"+OK")
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def login(self, user) -> None:
        assert self.reply(f"USER {user.name}".encode(), False).startswith(b"+OK")
        assert self.reply(f"PASS {user.password}".encode(), False).startswith(b"+OK")

    def flood(self, command: bytes, reply: bytes, count: int) -> None:
        assert not self.buf
        self.todo = memoryview(command * count)
        self.expected = reply * count
        self.sock.setblocking(False)

    def send_some(self) -> int:
        if not self.todo:
            return 0
        try:
            n = self.sock.send(self.todo[:65536])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        self.todo = self.todo[n:]
        return n

    def read_some(self) -> int:
        try:
            chunk = self.sock.recv(1 << 20)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return 0
        assert chunk, f"connection closed after {self.got} of {len(self.expected)} octets"
        end = self.got + len(chunk)
        assert end <= len(self.expected), "more replies than commands"
        if chunk != self.expected[self.got:end]:
            at = next(i for i in range(len(chunk)) if chunk[i] != self.expected[self.got + i])
            raise AssertionError(f"reply octet {self.got + at} differs: {chunk[max(0, at - 80):at + 80]!r}")
        self.got = end
        return len(chunk)

    def done(self) -> bool:
        return not self.todo and self.got == len(self.expected)


def send_without_reading(clients: list[Client], idle: float = 0.5, timeout: float = 10.0) -> None:
    """Push each client's flood as far as the server takes it, never reading:
    until everything is sent, or nothing more went out for ``idle`` seconds."""
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < idle:
        sent = sum(c.send_some() for c in clients)
        if sent:
            quiet_since = time.monotonic()
        elif all(not c.todo for c in clients):
            return
        else:
            time.sleep(0.01)


def read_everything(clients: list[Client], timeout: float = 60.0) -> None:
    """The clients read at last (sending what is left): every reply, in order."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    deadline = time.monotonic() + timeout
    pending = {id(c) for c in clients}
    while pending:
        assert time.monotonic() < deadline, [(c.got, len(c.expected), len(c.todo)) for c in clients]
        for key, events in sel.select(0.5):
            c = key.data
            if events & selectors.EVENT_WRITE:
                c.send_some()
                if not c.todo:
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            if events & selectors.EVENT_READ or c.sock.__class__ is ssl.SSLSocket:
                while c.read_some():  # (an SSL socket may hold decrypted data the selector does not see)
                    pass
            if c.done() and id(c) in pending:
                pending.discard(id(c))
                sel.unregister(c.sock)
    sel.close()
    for c in clients:
        c.sock.setblocking(True)
        c.sock.settimeout(10)
        assert c.reply(b"QUIT", False) == b"+OK Logging out.\r\n"
        c.sock.close()


def attack(srv: ServerProcess, clients: list[Client], command: bytes, per_connection: int = PER_CONNECTION) -> dict:
    """Flood every client with ``command``; check the bound, then the replies."""
    pid = srv.proc.pid
    count = FLOOD // (len(command) + 2)
    multiline = command in (b"CAPA", b"LIST")
    replies = [c.reply(command, multiline) for c in clients]  # what each will get, count times
    assert all(r.startswith(b"+OK") for r in replies), replies
    before = settled_rss(pid)
    for c, reply in zip(clients, replies, strict=True):
        c.flood(command + b"\r\n", reply, count)
    t = time.monotonic()
    send_without_reading(clients)
    growth = settled_rss(pid) - before
    sent = sum(count * (len(command) + 2) - len(c.todo) for c in clients)
    figures = {"command": command.decode(), "connections": len(clients), "sent_kib": sent // 1024,
               "asked_mib": round(sum(map(len, replies)) * count / 2**20, 1),
               "growth_mib": round(growth / 2**20, 2)}
    print(figures)
    assert growth < len(clients) * per_connection, figures
    read_everything(clients)
    figures["seconds"] = round(time.monotonic() - t, 2)
    return figures


def capa_clients(port: int, n: int, tls: ssl.SSLContext | None = None, stls: ssl.SSLContext | None = None):
    clients = []
    for _ in range(n):
        c = Client(port, tls)
        if stls is not None:
            c.starttls(stls)
        clients.append(c)
    return clients


def test_pipelined_capa_before_login(server):
    """The issue's attack: 320 KiB of CAPA (10 MiB of replies) on each of 12
    connections from one address, none of them read."""
    clients = capa_clients(server.port, CONNECTIONS)
    assert len(clients[0].reply(b"CAPA", True)) > 150  # 30 times its command
    attack(server, clients, b"CAPA")


@pytest.mark.parametrize("command", [b"CAPA", b"UIDL 1", b"NOOP", b"LIST"])
def test_pipelined_commands_after_login(server, command):
    """Logged-in clients pipeline short replies (CAPA; UIDL n: 78 octets for
    8, with a 70-character unique name; NOOP: shorter than its command) or
    listings (LIST of 40 messages: counted before too) and do not read."""
    clients = []
    for i in range(CONNECTIONS):
        user = server.add_user([message(f"m{j}") for j in range(40)])
        first = min(user.files())  # the oldest name is message 1: give it the longest UIDL there is
        first.rename(first.with_name(f"{1600000000 + i}.{'u' * 59}"))
        c = Client(server.port)
        c.login(user)
        clients.append(c)
    attack(server, clients, command)


# ----------------------------------------------------------------- TLS

@pytest.fixture(params=VARIANTS, ids=[f"{p}-{loop}" for p, loop in VARIANTS])
def tls_server(request, tmp_path):
    from support.tls import Certs, TLSServer

    parser, loop = request.param
    certs = Certs(tmp_path / "certs")
    srv = TLSServer(tmp_path, PARSERS[parser], certs, ["--log-level", "info"])
    srv.loop = loop
    yield from serving(srv)


def test_pipelined_capa_over_tls(tls_server):
    """The same through TLS: after STLS, and on the implicit-TLS port."""
    ctx = tls_server.certs.client_context()
    clients = capa_clients(tls_server.port, CONNECTIONS // 2, stls=ctx)
    implicit = capa_clients(tls_server.tls_port, CONNECTIONS // 2, tls=ctx)
    reply = clients[0].reply(b"CAPA", True)
    assert b"STLS" not in reply and implicit[0].reply(b"CAPA", True) == reply
    attack(tls_server, clients + implicit, b"CAPA", PER_TLS_CONNECTION)
