"""Micro-benchmarks of the hot paths, compiled parser against its twin.

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest

from fastpop import _parser_py
from fastpop.stuffing import stuff_message

try:
    from fastpop import _parser
except ImportError:  # pragma: no cover - the extension is part of every build
    _parser = None

IMPLS = {"c-parser": getattr(_parser, "CommandParser", None), "py-parser": _parser_py.CommandParser}

# A download session as a pipelining client (mpop) sends it, 20 messages.
PIPELINED = (
    b"CAPA\r\nUSER alice@example.com\r\nPASS correct horse battery staple\r\nSTAT\r\nUIDL\r\n"
    + b"".join(b"RETR %d\r\n" % i for i in range(1, 21))
    + b"".join(b"DELE %d\r\n" % i for i in range(1, 21))
    + b"QUIT\r\n"
)


@pytest.mark.parametrize("impl", list(IMPLS), ids=list(IMPLS))
def test_parse_pipelined_session(benchmark, impl):
    cls = IMPLS[impl]
    if cls is None:
        pytest.fail("compiled parser not built")
    benchmark.group = "parser: 46 pipelined commands"

    def run():
        p = cls()
        p.feed(PIPELINED)
        n = 0
        while p.next_command() is not None:
            n += 1
        return n

    assert benchmark(run) == 46


@pytest.mark.parametrize("impl", list(IMPLS), ids=list(IMPLS))
def test_parse_split_commands(benchmark, impl):
    cls = IMPLS[impl]
    if cls is None:
        pytest.fail("compiled parser not built")
    benchmark.group = "parser: one command per feed"
    lines = [b"RETR %d\r\n" % i for i in range(1, 101)]

    def run():
        p = cls()
        n = 0
        for line in lines:
            p.feed(line)
            if p.next_command() is not None:
                n += 1
        return n

    assert benchmark(run) == 100


def _message(size: int, dot_lines: bool) -> bytes:
    line = b".starts with a dot and goes on for a while......................\n" if dot_lines else (
        b"an ordinary line of text, LF-terminated as MTAs often store it....\n"
    )
    return (line * (size // len(line) + 1))[:size]


@pytest.mark.parametrize("size", [4 * 1024, 1024 * 1024], ids=["4KiB", "1MiB"])
@pytest.mark.parametrize("dots", [False, True], ids=["plain", "dot-lines"])
def test_stuff_message(benchmark, size, dots):
    benchmark.group = f"stuffing {size // 1024} KiB"
    data = _message(size, dots)
    out = benchmark(stuff_message, data)
    assert out.count(b"\r\n") >= data.count(b"\n")


# LIST and UIDL listings as the protocol formats them.  There is only one
# implementation today (Python, inline in protocol.py): these measure it on
# the mailbox sizes that matter, so a compiled formatter can be compared
# against the same numbers when it exists.


def _listing_session(n: int):
    from array import array
    from types import SimpleNamespace

    from fastpop.maildir import Mailbox

    names = [f"{1700000000 + i}.M{i}P4711.mail.example.com,S={3000 + i},W={3100 + i}:2," for i in range(n)]
    mailbox = Mailbox("/nonexistent", names, array("q", (3100 + i for i in range(n))))
    return SimpleNamespace(_mailbox=mailbox, _deleted=bytearray(n), _deleted_count=0, _deleted_size=0, _out=[])


@pytest.mark.parametrize("command", ["LIST", "UIDL"])
@pytest.mark.parametrize("n", [20, 1000, 100_000], ids=["20", "1k", "100k"])
def test_listing(benchmark, command, n):
    from fastpop.protocol import POP3Protocol

    benchmark.group = f"{command} listing, {n} messages"
    handler = POP3Protocol.cmd_list if command == "LIST" else POP3Protocol.cmd_uidl
    session = _listing_session(n)

    def run():
        session._out = []
        handler(session, ())
        return session._out

    out = benchmark(run)
    assert out[-1].endswith(b".\r\n") and out[-1].count(b"\r\n") == n + 1
