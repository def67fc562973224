"""Unit tests of fastpop/wire/stuffing.py against a plain reference of RFC 1939 output.

The reference works on whole messages, line by line, and is deliberately
naive: split on LF, drop a CR that directly precedes an LF, end every line in
CRLF (so a last line without a newline gets one), keep any other CR as an
ordinary octet, and double a leading "." on every line.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpop import _compiled
from fastpop.wire import stuffing
from fastpop.wire.stuffing import TopLimiter, pop3_size

# The transform (DotStuffer, stuff_message, pop3_size_of) exists twice: the
# compiled module and its pure-Python twin.  Every test of it runs against both
# (conftest's ``twin`` fixture: a compiled module that is not built fails,
# unless FASTPOP_NO_EXTENSIONS is set).
STUFFING = "fastpop.wire._stuffing"
# S is function-scoped but stateless: hypothesis may reuse it across examples
TWIN_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def S(twin):
    return twin(STUFFING)


def test_twin_is_the_module_asked_for(S):
    if S.__name__ == STUFFING:
        assert S.__file__.endswith((".so", ".pyd")), S.__file__
    else:
        assert S.__name__ == _compiled.TWINS[STUFFING]
        assert S.__file__.endswith(".py"), S.__file__


def test_public_module_uses_the_chosen_implementation():
    chosen = STUFFING if stuffing.STUFFING_IMPL == "cython" else _compiled.TWINS[STUFFING]
    assert stuffing.STUFFING_IMPL == ("python" if _compiled.NO_EXTENSIONS else "cython")
    mod = importlib.import_module(chosen)
    assert stuffing.DotStuffer is mod.DotStuffer
    assert stuffing.stuff_message is mod.stuff_message
    assert stuffing.pop3_size_of is mod.pop3_size_of
    assert stuffing.line_dots is mod.line_dots
    assert stuffing.first_dot_line is mod.first_dot_line


# ---------------------------------------------------------------- reference


def ref_lines(data: bytes) -> list[bytes]:
    """The message's lines, without their terminators (LF or CRLF)."""
    if not data:
        return []
    parts = data.split(b"\n")
    ends_with_lf = parts[-1] == b""
    if ends_with_lf:
        parts.pop()
    lines = []
    for i, part in enumerate(parts):
        terminated = i < len(parts) - 1 or ends_with_lf
        if terminated and part.endswith(b"\r"):
            part = part[:-1]
        lines.append(part)
    return lines


def ref_unstuffed(data: bytes) -> bytes:
    return b"".join(line + b"\r\n" for line in ref_lines(data))


def _stuff_line(line: bytes) -> bytes:
    return (b"." + line if line.startswith(b".") else line) + b"\r\n"


def ref_stuffed(data: bytes) -> bytes:
    return b"".join(_stuff_line(line) for line in ref_lines(data))


def ref_top(data: bytes, n: int) -> bytes:
    """TOP: the header, the empty line, then at most n body lines.

    A message without an empty line is all header and is sent whole.
    """
    lines = ref_lines(data)
    if b"" in lines:
        lines = lines[: lines.index(b"") + 1 + n]
    return b"".join(_stuff_line(line) for line in lines)


# ---------------------------------------------------------------- helpers


def cut(data: bytes, points) -> list[bytes]:
    points = sorted(min(max(p, 0), len(data)) for p in points)
    chunks, prev = [], 0
    for q in list(points) + [len(data)]:
        chunks.append(data[prev:q])
        prev = q
    return chunks


def stuff_chunks(S, chunks) -> bytes:
    s = S.DotStuffer()
    out = b"".join(s.feed(c) for c in chunks)
    return out + s.finish()


def top_chunks(S, chunks, n: int) -> bytes:
    """TOP as the sender streams it: stuffer output through the limiter."""
    s, t = S.DotStuffer(), TopLimiter(n)
    out = b""
    for c in chunks:
        out += t.feed(s.feed(c))
        if t.done:
            return out
    return out + t.feed(s.finish())


def all_two_way_splits(data: bytes):
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def all_three_way_splits(data: bytes):
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            yield [data[:i], data[i:j], data[j:]]


def unstuffed_size_of_output(out: bytes) -> int:
    """len(stuffed output) minus the one stuffing dot of every dot-led line."""
    lines = out.split(b"\r\n")
    assert lines[-1] == b""
    return len(out) - sum(1 for line in lines[:-1] if line.startswith(b".."))


# ---------------------------------------------------------------- the reference itself


def test_reference_sanity():
    assert ref_stuffed(b"") == b""
    assert ref_stuffed(b"a") == b"a\r\n"
    assert ref_stuffed(b".\n") == b"..\r\n"
    assert ref_stuffed(b"a\r") == b"a\r\r\n"
    assert ref_stuffed(b"a\r\r\nb") == b"a\r\r\nb\r\n"
    assert ref_top(b"H: 1\n\nb1\nb2\n", 1) == b"H: 1\r\n\r\nb1\r\n"
    assert ref_top(b"H: 1\nH: 2\n", 0) == b"H: 1\r\nH: 2\r\n"


# ---------------------------------------------------------------- stuff_message examples

EXAMPLES = {
    "empty": (b"", b""),
    "one-line-no-newline": (b"hello", b"hello\r\n"),
    "crlf": (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    "bare-lf": (b"a\nb\n", b"a\r\nb\r\n"),
    "dot-line": (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
    "dotdot-line": (b"a\r\n..\r\nb\r\n", b"a\r\n...\r\nb\r\n"),
    "dot-x": (b"a\n.x\n", b"a\r\n..x\r\n"),
    "leading-dot-line-1": (b".first\r\nsecond\r\n", b"..first\r\nsecond\r\n"),
    "only-dot": (b".", b"..\r\n"),
    "only-dot-lf": (b".\n", b"..\r\n"),
    "ends-with-terminator": (b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n..\r\n"),
    "ends-with-dot-no-newline": (b"a\r\n.", b"a\r\n..\r\n"),
    "bare-cr": (b"a\rb\r\n", b"a\rb\r\n"),
    "bare-cr-then-dot": (b"a\r.b\n", b"a\r.b\r\n"),
    "cr-at-end": (b"abc\r", b"abc\r\r\n"),
    "only-cr": (b"\r", b"\r\r\n"),
    "cr-cr-lf": (b"a\r\r\n", b"a\r\r\n"),
    "lf-cr": (b"a\n\rb", b"a\r\n\rb\r\n"),
    "mixed": (b"1\r\n2\n3\r4\r\n\n.\r\r\n..\n", b"1\r\n2\r\n3\r4\r\n\r\n..\r\r\n...\r\n"),
    "empty-lines": (b"\n\n\r\n", b"\r\n\r\n\r\n"),
    "nul-and-8bit": (b"\x00a\xff\n.\x00\n\x80\xfe", b"\x00a\xff\r\n..\x00\r\n\x80\xfe\r\n"),
    "dots-everywhere": (b"...\n.\n.\n", b"....\r\n..\r\n..\r\n"),
    # near misses of stuff_message's pass-through (CRLF lines, none starting with ".")
    "crlf-dot-inside-lines": (b"a.b\r\nc.\r\n", b"a.b\r\nc.\r\n"),
    "crlf-then-bare-lf-last": (b"a\r\nb\n", b"a\r\nb\r\n"),
    "bare-lf-first-then-crlf": (b"\nb\r\n", b"\r\nb\r\n"),
    "crlf-dot-second-line": (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
    "crlf-dot-last-line": (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n..\r\n"),
    "crlf-only": (b"\r\n", b"\r\n"),
    "crlf-unended-last": (b"a\r\nb", b"a\r\nb\r\n"),
}


@pytest.mark.parametrize("data, want", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_stuff_message_examples(S, data, want):
    assert ref_stuffed(data) == want  # the expected value agrees with the reference
    assert S.stuff_message(data) == want


@pytest.mark.parametrize("data, want", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_stuffer_split_anywhere(S, data, want):
    for chunks in all_three_way_splits(data):
        assert stuff_chunks(S, chunks) == want, chunks
    assert stuff_chunks(S, [bytes([b]) for b in data]) == want
    assert stuff_chunks(S, [b""] + [bytes([b]) for b in data] + [b""]) == want


def test_output_never_contains_bare_lf_or_terminator(S):
    data = b"a\n.\n\n.\r\n\r.\r\n\n"
    out = S.stuff_message(data)
    assert out.count(b"\n") == out.count(b"\r\n")
    assert b"\r\n.\r\n" not in b"\r\n" + out


def test_stuffer_finish_alone(S):
    s = S.DotStuffer()
    assert s.finish() == b""
    s = S.DotStuffer()
    assert s.feed(b"") == b""
    assert s.finish() == b""


def test_stuffer_holds_back_trailing_cr(S):
    s = S.DotStuffer()
    assert s.feed(b"ab\r") == b"ab"
    assert s.feed(b"\n.c") == b"\r\n..c"
    assert s.finish() == b"\r\n"


def test_stuffer_finish_is_idempotent(S):
    s = S.DotStuffer()
    s.feed(b"x\r")
    assert s.finish() == b"\r\r\n"
    assert s.finish() == b""


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("data, want", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_pop3_size_of_examples(S, data, want):
    expected = len(ref_unstuffed(data))
    assert S.pop3_size_of(data) == expected
    assert unstuffed_size_of_output(S.stuff_message(data)) == expected


def test_pop3_size_of_simple_values(S):
    assert S.pop3_size_of(b"") == 0
    assert S.pop3_size_of(b"a") == 3
    assert S.pop3_size_of(b"a\n") == 3
    assert S.pop3_size_of(b"a\r\n") == 3
    assert S.pop3_size_of(b"a\r") == 4
    assert S.pop3_size_of(b"\n\n") == 4
    assert S.pop3_size_of(b".\r\n") == 3  # the stuffing dot is not counted


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize("data, want", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_pop3_size_of_file(S, tmp_path, data, want):
    path = write(tmp_path / "msg", data)
    assert pop3_size(path) == S.pop3_size_of(data) == len(ref_unstuffed(data))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("data, want", list(EXAMPLES.values()), ids=list(EXAMPLES))
def test_pop3_size_small_file_chunks(tmp_path, monkeypatch, chunk, data, want):
    monkeypatch.setattr(stuffing, "CHUNK", chunk)
    path = write(tmp_path / "msg", data)
    assert pop3_size(path) == len(ref_unstuffed(data))


def test_pop3_size_crlf_straddling_chunks(tmp_path, monkeypatch):
    data = b"abc\r\ndef\nghi\r\r\n\r\n\n\rx"
    path = write(tmp_path / "msg", data)
    want = len(ref_unstuffed(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 3, os.SEEK_SET)
        for chunk in range(1, len(data) + 2):
            monkeypatch.setattr(stuffing, "CHUNK", chunk)
            assert pop3_size(path) == want, chunk
            assert pop3_size(fd) == want, chunk  # a descriptor: read whole, with pread
        assert os.lseek(fd, 0, os.SEEK_CUR) == 3  # its offset untouched
    finally:
        os.close(fd)


def test_pop3_size_large_file(S, tmp_path):
    line = b"x" * 70
    data = (line + b"\n") * 10000 + (line + b"\r\n") * 10000 + b".\rtail"
    path = write(tmp_path / "msg", data)
    assert len(data) > stuffing.CHUNK
    assert pop3_size(path) == S.pop3_size_of(data) == len(ref_unstuffed(data))


def test_pop3_size_missing_file(tmp_path):
    with pytest.raises(OSError):
        pop3_size(str(tmp_path / "nope"))


# ---------------------------------------------------------------- TOP

TOP_MESSAGES = {
    "simple": b"From: a\r\nSubject: s\r\n\r\nline 1\r\nline 2\r\nline 3\r\n",
    "bare-lf": b"From: a\nSubject: s\n\nline 1\nline 2\nline 3",
    "dots": b"From: a\n\n.\n..\n.x\n",
    "no-blank-line": b"From: a\r\nSubject: only headers\r\n",
    "no-blank-no-newline": b"From: a",
    "empty-header-block": b"\r\nbody 1\r\nbody 2\r\n",
    "empty-header-block-lf": b"\nbody 1\n",
    "only-blank": b"\r\n",
    "empty": b"",
    "blank-line-last": b"H: 1\r\n\r\n",
    "two-blank-lines": b"H: 1\r\n\r\n\r\nb2\r\n",
    "cr-in-header": b"H: 1\r\r\n\r\nbody\r\n",
    "cr-at-end-of-body": b"H: 1\n\nbody\r",
    "body-without-newline": b"H: 1\n\nb1\nb2",
    "blank-after-bare-cr": b"H: 1\r\n\r\r\nb1\r\n\r\nb2\r\n",
}


@pytest.mark.parametrize("n", [0, 1, 2, 10**9])
@pytest.mark.parametrize("name", list(TOP_MESSAGES))
def test_top_whole(S, name, n):
    data = TOP_MESSAGES[name]
    assert top_chunks(S, [data], n) == ref_top(data, n)


@pytest.mark.parametrize("n", [0, 1, 2, 10**9])
@pytest.mark.parametrize("name", list(TOP_MESSAGES))
def test_top_chunked_everywhere(S, name, n):
    data = TOP_MESSAGES[name]
    want = ref_top(data, n)
    for chunks in all_three_way_splits(data):
        assert top_chunks(S, chunks, n) == want, chunks
    assert top_chunks(S, [bytes([b]) for b in data], n) == want


def test_top_examples_explicit(S):
    msg = TOP_MESSAGES["simple"]
    assert top_chunks(S, [msg], 0) == b"From: a\r\nSubject: s\r\n\r\n"
    assert top_chunks(S, [msg], 1) == b"From: a\r\nSubject: s\r\n\r\nline 1\r\n"
    assert top_chunks(S, [msg], 2) == b"From: a\r\nSubject: s\r\n\r\nline 1\r\nline 2\r\n"
    assert top_chunks(S, [msg], 10**9) == msg
    assert top_chunks(S, [TOP_MESSAGES["empty-header-block"]], 0) == b"\r\n"
    assert top_chunks(S, [TOP_MESSAGES["empty-header-block"]], 1) == b"\r\nbody 1\r\n"
    assert top_chunks(S, [TOP_MESSAGES["no-blank-line"]], 0) == TOP_MESSAGES["no-blank-line"]
    assert top_chunks(S, [TOP_MESSAGES["dots"]], 2) == b"From: a\r\n\r\n..\r\n...\r\n"
    assert top_chunks(S, [TOP_MESSAGES["body-without-newline"]], 5) == b"H: 1\r\n\r\nb1\r\nb2\r\n"


def test_top_limiter_done_flag():
    t = TopLimiter(1)
    assert not t.done
    assert t.feed(b"H: v\r\n") == b"H: v\r\n"
    assert not t.done
    assert t.feed(b"\r\nb1\r\nb2\r\n") == b"\r\nb1\r\n"
    assert t.done
    assert t.feed(b"more\r\n") == b""


def test_top_render_small_matches_reference():
    from fastpop.session.sending import render_small

    for data in list(TOP_MESSAGES.values()) + [d for d, _ in EXAMPLES.values()]:
        assert render_small(data, None) == ref_stuffed(data)
        for n in (0, 1, 3):
            assert render_small(data, n) == ref_top(data, n), (data, n)


# ---------------------------------------------------------------- property tests

PIECES = [b"\r", b"\n", b"\r\n", b"\r\n", b".", b"..", b"\r\n.", b"\n.", b"\r\n\r\n", b"a", b"xyz",
          b"\x00", b"\xff", b"\x80", b"Subject: t", b" "]
messages = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=4)), max_size=40).map(b"".join)


@st.composite
def split_messages(draw):
    data = draw(messages)
    points = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return data, cut(data, points)


@settings(TWIN_SETTINGS, max_examples=300)
@given(messages)
def test_prop_stuff_message_matches_reference(S, data):
    out = S.stuff_message(data)
    assert out == ref_stuffed(data)
    assert S.pop3_size_of(data) == len(ref_unstuffed(data)) == unstuffed_size_of_output(out)


@settings(TWIN_SETTINGS, max_examples=300)
@given(split_messages())
def test_prop_stuffer_chunked(S, arg):
    data, chunks = arg
    assert stuff_chunks(S, chunks) == S.stuff_message(data) == ref_stuffed(data)


@settings(TWIN_SETTINGS, max_examples=300)
@given(messages, st.integers(1, 9))
def test_prop_pop3_size_file(S, data, chunk):
    with tempfile.TemporaryDirectory() as d:
        path = write(os.path.join(d, "m"), data)
        with mock.patch.object(stuffing, "CHUNK", chunk):
            size = pop3_size(path)
    assert size == len(ref_unstuffed(data))
    assert S.pop3_size_of(data) == size


@settings(TWIN_SETTINGS, max_examples=300)
@given(split_messages(), st.one_of(st.integers(0, 5), st.just(10**9)))
def test_prop_top(S, arg, n):
    data, chunks = arg
    assert top_chunks(S, chunks, n) == top_chunks(S, [data], n) == ref_top(data, n)


@settings(TWIN_SETTINGS, max_examples=200)
@given(messages, st.integers(0, 5))
def test_prop_top_is_prefix_of_retr(S, data, n):
    top = top_chunks(S, [data], n)
    full = S.stuff_message(data)
    assert full.startswith(top)
    assert top_chunks(S, [data], n + 1).startswith(top)


# ---------------------------------------------------------------- dot lines: the RETR scan and the index's bit


def ref_dot_lines(data: bytes, after_lf: bool = True) -> list[int]:
    """Offsets of the "." that start a line (a line starts after a LF, and at 0 if after_lf)."""
    return [i for i in range(len(data)) if data[i] == 46 and (data[i - 1] == 10 if i else after_lf)]


# long runs, so the compiled scan's 64-octet turns and their edges are crossed
dotted = st.lists(st.one_of(st.sampled_from([b"\n", b".", b"\r\n", b"\n.", b"x", b"."]),
                            st.integers(1, 140).map(lambda n: b"y" * n)), max_size=60).map(b"".join)


@settings(TWIN_SETTINGS, max_examples=400)
@given(dotted, st.booleans(), st.integers(0, 1000))
def test_prop_dot_line_search(S, data, after_lf, base):
    for buf in (data, bytearray(data), memoryview(data)):
        found: list[int] = []
        ends_lf = S.line_dots(buf, base, after_lf, found)
        want = ref_dot_lines(data, after_lf)
        assert found == [base + i for i in want]
        assert ends_lf == (data.endswith(b"\n") if data else after_lf)
        assert S.first_dot_line(buf, after_lf) == (want[0] if want else -1)


@settings(TWIN_SETTINGS, max_examples=300)
@given(dotted, st.booleans(), st.integers(0, 6))
def test_prop_dot_line_search_stops_at_most(S, data, after_lf, most):
    """``most``: the first that many, no more (a dense window is judged by a few,
    not listed whole in the event loop); whether it ends with LF all the same."""
    found: list[int] = []
    ends_lf = S.line_dots(data, 7, after_lf, found, most)
    assert found == [7 + i for i in ref_dot_lines(data, after_lf)][:most]
    assert ends_lf == (data.endswith(b"\n") if data else after_lf)


@pytest.mark.parametrize("at", [0, 1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 4095, 4096])
def test_dot_line_at_every_vector_edge(S, at):
    data = bytearray(b"z" * (at + 200))
    if at:
        data[at - 1] = 10
    data[at] = 46
    found: list[int] = []
    S.line_dots(bytes(data), 0, False, found)
    assert found == ref_dot_lines(bytes(data), False) == ([at] if at else [])
    assert S.first_dot_line(bytes(data), True) == at


@settings(TWIN_SETTINGS, max_examples=300)
@given(dotted, st.integers(1, 9), st.booleans())
def test_prop_scan_file(S, data, chunk, count_size):
    """scan_file reads a file in chunks (here tiny ones): the POP3 size, whether a
    line starts with ".", and the last octet, as the reference says."""
    with tempfile.TemporaryDirectory() as d:
        fd = os.open(write(os.path.join(d, "m"), data), os.O_RDONLY)
        try:
            with mock.patch.object(stuffing, "CHUNK", chunk), \
                    mock.patch.object(stuffing, "first_dot_line", S.first_dot_line):
                size, dots, last = stuffing.scan_file(fd, len(data), count_size)
        finally:
            os.close(fd)
    has_dots = bool(ref_dot_lines(data))
    assert dots == has_dots
    if count_size:
        assert size == len(ref_unstuffed(data)) == S.pop3_size_of(data)
        assert last == (data[-1] if data else -1)
    elif not has_dots:
        assert last == (data[-1] if data else -1)


def test_scan_file_of_a_file_that_shrank(tmp_path):
    path = write(str(tmp_path / "m"), b"abc\r\n.d\r\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert stuffing.scan_file(fd, 100) == (len(b"abc\r\n.d\r\n"), True, -1)
        assert stuffing.scan_file(fd, 5, count_size=False) == (0, False, 10)
    finally:
        os.close(fd)
