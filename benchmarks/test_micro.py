"""Micro-benchmarks of the hot paths, compiled parser against its twin.

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import pytest

from fastpop.store import _index, _index_py
from fastpop.wire import (
    _parser,  # compiled: the benchmarks compare it with its twin
    _parser_py,
)
from fastpop.wire.stuffing import stuff_message

IMPLS = {"c-parser": _parser.CommandParser, "py-parser": _parser_py.CommandParser}

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


# LIST and UIDL listings, formatted from the mailbox index (fastpop/store/index.py),
# compiled (fastpop.store._index) against its pure-Python twin (fastpop.store._index_py).

FORMATTERS = {"c-index": _index, "py-index": _index_py}


def _index_buffer(n: int) -> bytes:
    from fastpop.store.index import Entry, encode

    entries = [
        Entry(f"{1700000000 + i}.M{i}P4711.mail.example.com,S={3000 + i},W={3100 + i}:2,", 3100 + i, 3100 + i, 1,
              f"{1700000000 + i}.M{i}P4711.mail.example.com")
        for i in range(n)
    ]
    return encode(entries, 0, 0)


@pytest.mark.parametrize("impl", list(FORMATTERS), ids=list(FORMATTERS))
@pytest.mark.parametrize("command", ["LIST", "UIDL"])
@pytest.mark.parametrize("n", [20, 1000, 100_000], ids=["20", "1k", "100k"])
def test_listing(benchmark, impl, command, n):
    module = FORMATTERS[impl]
    if module is None:
        pytest.fail("compiled index formatter not built")
    from fastpop.store.index import MailboxIndex

    benchmark.group = f"{command} listing, {n} messages"
    index = MailboxIndex(_index_buffer(n))
    deleted = bytearray(n)
    if command == "LIST":
        out = benchmark(module.format_list, index.buf, n, deleted)
    else:
        out = benchmark(module.format_uidl, index.buf, n, index.names_off, deleted)
    assert out.count(b"\r\n") == n and out.startswith(b"1 ")
    other = FORMATTERS["py-index"]
    expected = other.format_list(index.buf, n, deleted) if command == "LIST" else other.format_uidl(
        index.buf, n, index.names_off, deleted)
    assert out == expected


def _bench_retr_reply() -> tuple[bytes, int]:
    from fastpop.bench.spawn import MessageFactory

    msg = MessageFactory(1).message("u", 1, 3700)
    wire = (b"\r\n" + msg).replace(b"\r\n.", b"\r\n..")[2:]
    return b"+OK %d octets\r\n" % len(msg) + wire + b".\r\n", len(msg)


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_bench_client_whole_retr(benchmark, impl):
    """fastpop bench's in-place check of one 3.7 KB RETR reply (SHA-256 included)."""
    from fastpop.bench import _wire_py

    if impl == "compiled":
        from fastpop.bench import _wire as mod
    else:
        mod = _wire_py
    benchmark.group = "bench client: verify a whole 3.7 KB RETR reply"
    reply, size = _bench_retr_reply()
    assert benchmark(mod.whole_retr, reply) == size
