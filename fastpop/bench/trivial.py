"""A trivial POP3 responder: the load generator's yardstick, and a liar on demand.

It accepts any user and password and answers from memory, with canned
replies, so it costs next to nothing per session: what bench reaches against
it is the generator's own ceiling on this machine.  With ``corrupt`` it flips
one byte in the body of every ``corrupt``-th RETR, which bench must notice.

Two engines give the same replies.  The default (``--engine compiled``) is
the epoll engine, ``_trivial.pyx``: a loop that costs little more than its
system calls, as the yardstick should take as little as it can of the cores
it shares with the generator.  Where it is not built, or
``FASTPOP_NO_EXTENSIONS`` is set, its pure-Python twin ``_trivial_py.py``
runs instead (``fastpop._compiled`` chooses; the startup line says which:
"compiled engine" or "python epoll engine").  ``--engine asyncio`` is
``TrivialProtocol`` on an asyncio loop.

``--maildirs ROOT`` (asyncio engine) adds to each session the system calls a
safe Maildir login cannot do without, and nothing else: at PASS, lstat of
ROOT/<user> (the lock's key), an OFD lock taken in one file and looked up in
another (as fastpop's lock table does for older versions), lstat of new/,
cur/ and fastpop.index; at each RETR the open, read and close of the message's
file in cur/ (the names listed once per user and kept, as an index would);
at the session's end the unlock and one log line.
What a POP3 server on uvloop's Python protocol pays before any logic of its
own: the floor under fastpop's login (benchmarks/compare_dovecot.py
``--login-floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile

from fastpop import _compiled
from fastpop.bench.spawn import MessageFactory, SizeDistribution
from fastpop.store.locking import slot


def _stuff(data: bytes) -> bytes:
    out = data.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


class TrivialState:
    def __init__(self, messages: int, size: SizeDistribution, corrupt: int = 0, seed: int = 1) -> None:
        factory = MessageFactory(seed)
        bodies = [factory.message("trivial", n, size.sample(factory.rng)) for n in range(1, messages + 1)]
        self.retr = [b"+OK %d octets\r\n" % len(m) + _stuff(m) + b".\r\n" for m in bodies]
        self.corrupted = []
        for m in bodies:
            bad = bytearray(m)
            i = len(bad) - len(bad) // 3  # in the body, well past the headers
            bad[i] = bad[i] ^ 0x20 if bad[i] not in (13, 10, 46) else bad[i]
            if bad == bytearray(m):
                bad[-3] ^= 0x20
            self.corrupted.append(b"+OK %d octets\r\n" % len(m) + _stuff(bytes(bad)) + b".\r\n")
        self.stat = b"+OK %d %d\r\n" % (len(bodies), sum(map(len, bodies)))
        self.uidl = b"+OK\r\n" + b"".join(b"%d trivial-%d\r\n" % (n, n) for n in range(1, messages + 1)) + b".\r\n"
        self.list = (b"+OK %d messages\r\n" % messages
                     + b"".join(b"%d %d\r\n" % (n, len(m)) for n, m in enumerate(bodies, 1)) + b".\r\n")
        self.corrupt = corrupt
        self.retr_count = 0


LINE_LIMIT = 1024  # a command line this long (before its LF, a CR included) closes the connection
CAPA = b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nPIPELINING\r\nSASL PLAIN\r\nIMPLEMENTATION trivial\r\n.\r\n"


class TrivialProtocol(asyncio.Protocol):
    __slots__ = ("state", "transport", "buf")

    def __init__(self, state: TrivialState) -> None:
        self.state = state
        self.buf = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"+OK trivial ready\r\n")

    def data_received(self, data: bytes) -> None:
        # Framed as the epoll engine frames: a line ends at LF (a CR before it is
        # dropped); one of LINE_LIMIT octets or more before its LF closes the connection,
        # once the lines before it are answered.
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        out: list[bytes] = []
        st = self.state
        for line in lines:
            if len(line) >= LINE_LIMIT:
                return self._close(out)
            if line[-1:] == b"\r":
                line = line[:-1]
            word = line[:4].upper()
            if word == b"RETR":
                arg = line[5:]
                i = int(arg) - 1 if arg.isdigit() else -1
                if not 0 <= i < len(st.retr):
                    out.append(b"-ERR no such message\r\n")
                    continue
                st.retr_count += 1
                corrupt = st.corrupt and st.retr_count % st.corrupt == 0
                out.append(st.corrupted[i] if corrupt else st.retr[i])
            elif word == b"STAT":
                out.append(st.stat)
            elif word == b"UIDL":
                out.append(st.uidl)
            elif word == b"LIST":
                out.append(st.list)
            elif word == b"CAPA":
                out.append(CAPA)
            elif word == b"QUIT":
                out.append(b"+OK bye\r\n")
                return self._close(out)
            else:  # USER, PASS, AUTH, DELE, NOOP, RSET: all fine
                out.append(b"+OK\r\n")
        if len(self.buf) >= LINE_LIMIT:
            return self._close(out)
        if out:
            self.transport.write(b"".join(out))

    def _close(self, out: list[bytes]) -> None:
        if out:
            self.transport.write(b"".join(out))
        self.transport.close()


_FLOCK = struct.Struct("hhqqi4x")  # struct flock, as fastpop.store.locking packs it
MESSAGE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LoginCalls:
    """The files a login's system calls go to (``--maildirs``): the Maildirs' root,
    and in ``state_dir`` the lock file, the older lock file and the session log."""

    def __init__(self, maildirs: str, state_dir: str) -> None:
        self.maildirs = maildirs
        self.names: dict[str, list[str]] = {}  # Maildir -> the files in its cur/, listed at its first login
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self.lock_fd = os.open(os.path.join(state_dir, "mailbox.locks"), flags, 0o600)
        self.older_fd = os.open(os.path.join(state_dir, "mailbox.locks.older"), flags, 0o600)
        self.log_fd = os.open(os.path.join(state_dir, "sessions.log"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        for fd in (self.lock_fd, self.older_fd, self.log_fd):
            os.close(fd)


class LoginCallsProtocol(TrivialProtocol):
    """TrivialProtocol making a login's system calls (see the module's docstring)."""

    __slots__ = ("calls", "user", "offset", "cur")

    def __init__(self, state: TrivialState, calls: LoginCalls) -> None:
        super().__init__(state)
        self.calls = calls
        self.user = b""
        self.offset = -1  # the locked byte while logged in
        self.cur = ""  # the Maildir's cur/ while logged in

    def data_received(self, data: bytes) -> None:
        for line in (self.buf + data).split(b"\n")[:-1]:  # (the complete lines TrivialProtocol answers)
            word = line[:5].upper()
            if word == b"USER ":
                self.user = line[5:].strip()
            elif word == b"PASS " and self.offset < 0:
                self._login()
            elif word == b"RETR " and self.offset >= 0:
                self._read_message(line[5:].strip())
        super().data_received(data)

    def _read_message(self, arg: bytes) -> None:
        names = self.calls.names[self.cur]
        i = int(arg) - 1 if arg.isdigit() else -1
        if 0 <= i < len(names):
            try:
                fd = os.open(os.path.join(self.cur, names[i]), MESSAGE_FLAGS)
            except OSError:
                return
            try:
                os.read(fd, 1 << 16)
            finally:
                os.close(fd)

    def _login(self) -> None:
        calls = self.calls
        maildir = os.path.join(calls.maildirs, os.fsdecode(self.user))
        try:
            st = os.lstat(maildir)
        except (OSError, ValueError):  # no such user: the trivial answer stands
            return
        offset = slot(st.st_dev, st.st_ino)
        try:
            fcntl.fcntl(calls.lock_fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        except OSError:  # held by another session: as a refused login, no more calls
            return
        self.offset = offset
        fcntl.fcntl(calls.older_fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        for name in ("new", "cur", "fastpop.index"):
            try:
                os.lstat(os.path.join(maildir, name))
            except OSError:
                pass
        self.cur = os.path.join(maildir, "cur")
        if self.cur not in calls.names:
            try:
                calls.names[self.cur] = sorted(os.listdir(self.cur))
            except OSError:
                calls.names[self.cur] = []

    def connection_lost(self, exc: Exception | None) -> None:
        if self.offset >= 0:
            calls = self.calls
            fcntl.fcntl(calls.lock_fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self.offset, 1, 0))
            self.offset = -1
            os.write(calls.log_fd, b"trivial: session user=%s ip=127.0.0.1 end=quit\n" % self.user)


async def serve(host: str, port: int, state: TrivialState, ready=None, calls: LoginCalls | None = None) -> None:
    loop = asyncio.get_running_loop()
    factory = (lambda: TrivialProtocol(state)) if calls is None else (lambda: LoginCallsProtocol(state, calls))
    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"trivial POP3 server listening on {addr[0]}:{addr[1]} (pid {os.getpid()}, asyncio engine)", file=sys.stderr,
          flush=True)
    stop = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish)
    await stop
    server.close()


def epoll_engine() -> tuple[type, str]:
    """The epoll engine's class and its name in the startup line: the compiled one, or
    its pure-Python twin where that is not built or FASTPOP_NO_EXTENSIONS is set."""
    module = _compiled.load("fastpop.bench._trivial")
    if _compiled.LOADED["fastpop.bench._trivial"] == "cython":
        return module.TrivialEngine, "compiled"
    return module.TrivialEngine, "python epoll"


def serve_epoll(host: str, port: int, state: TrivialState) -> None:
    """Runs the epoll engine (compiled, or its twin) until SIGTERM or SIGINT."""
    engine_class, name = epoll_engine()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    wake_r, wake_w = socket.socketpair()
    with socket.socket(family, socket.SOCK_STREAM) as sock, wake_r, wake_w:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
        sock.bind((host, port))
        sock.listen(4096)
        for s in (sock, wake_r, wake_w):
            s.setblocking(False)
        addr = sock.getsockname()
        implementation = b"trivial-" + name.replace(" ", "-").encode()  # CAPA too names the engine
        engine = engine_class(sock.fileno(), wake_r.fileno(), state,
                              CAPA.replace(b"trivial\r\n", implementation + b"\r\n"))
        # a signal wakes the loop through the socket pair wherever it lands (in epoll_wait or not)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, stop)
            print(f"trivial POP3 server listening on {addr[0]}:{addr[1]} (pid {os.getpid()}, {name} engine)",
                  file=sys.stderr, flush=True)
            engine.serve()
        except Stop:
            pass
        finally:
            signal.set_wakeup_fd(-1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    p.add_argument("--messages", type=int, default=20, help="messages in every mailbox (default 20)")
    p.add_argument("--message-size", default="3700", help="size or distribution (default 3700)")
    p.add_argument("--corrupt", type=int, default=0, metavar="N",
                   help="flip a byte in every N-th RETR (to test integrity checking)")
    p.add_argument("--engine", choices=["compiled", "asyncio"], default="compiled",
                   help="compiled (default): the compiled epoll engine, or its pure-Python twin where it is "
                        "not built or FASTPOP_NO_EXTENSIONS is set; asyncio: the asyncio engine")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the asyncio engine's loop")
    p.add_argument("--maildirs", metavar="ROOT",
                   help="asyncio engine: also make the system calls a safe login makes against ROOT/<user> "
                        "(lstat, lock, stats of new/ cur/ and the index, unlock, a log line): a login's floor")
    p.add_argument("--state-dir", metavar="DIR",
                   help="with --maildirs: where its lock files and session log go (default: a temporary "
                        "directory, removed at exit)")


def main(args: argparse.Namespace) -> int:
    from fastpop.bench.load import new_loop
    from fastpop.net import parse_address

    host, port = parse_address(args.listen)
    state = TrivialState(args.messages, SizeDistribution.parse(args.message_size), args.corrupt)
    if args.maildirs and args.engine != "asyncio":
        print("trivial-server: --maildirs needs --engine asyncio", file=sys.stderr)
        return 2
    if args.engine == "compiled":
        serve_epoll(host, port, state)
        return 0
    calls = None
    if args.maildirs:
        state_dir: str = args.state_dir or tempfile.mkdtemp(prefix="fastpop-trivial-")
        calls = LoginCalls(args.maildirs, state_dir)
    loop = new_loop(args.loop)
    try:
        loop.run_until_complete(serve(host, port, state, calls=calls))
    finally:
        loop.close()
        if calls is not None:
            calls.close()
            if not args.state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
    return 0
