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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from fastpop import _compiled
from fastpop.bench.spawn import MessageFactory, SizeDistribution


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


async def serve(host: str, port: int, state: TrivialState, ready=None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: TrivialProtocol(state), host, port, backlog=4096, reuse_address=True)
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


def main(args: argparse.Namespace) -> int:
    from fastpop.bench.load import new_loop
    from fastpop.net import parse_address

    host, port = parse_address(args.listen)
    state = TrivialState(args.messages, SizeDistribution.parse(args.message_size), args.corrupt)
    if args.engine == "compiled":
        serve_epoll(host, port, state)
        return 0
    loop = new_loop(args.loop)
    try:
        loop.run_until_complete(serve(host, port, state))
    finally:
        loop.close()
    return 0
