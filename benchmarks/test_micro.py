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
