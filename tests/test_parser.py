"""Unit tests of the POP3 command parser: the compiled one and its Python twin.

Every example-based test runs against both implementations (conftest's
``twin`` fixture: ids ``compiled`` and ``python``); a compiled parser that is
not built fails them unless FASTPOP_NO_EXTENSIONS is set.  The hypothesis
tests at the end compare each implementation with a small independent
reference model, check that the results do not depend on how the stream is
split into chunks, and feed both the same random operations and require
identical results.
"""

from __future__ import annotations

import importlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpop import _compiled
from fastpop.wire.commands import (
    KEYWORDS,
    MAX_COMMAND_LINE,
    MAX_CONTINUATION_LINE,
    REST_OF_LINE,
    Command,
)

pytestmark = pytest.mark.unit

PARSER = "fastpop.wire._parser"
# P is function-scoped but stateless: hypothesis may reuse it across examples
TWIN_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def P(twin):
    return twin(PARSER).CommandParser


def drain(p) -> list:
    out = []
    while (r := p.next_command()) is not None:
        out.append(r)
    return out


def parse(cls, data: bytes, utf8: bool = False, **kw) -> list:
    p = cls(**kw)
    p.utf8 = utf8
    p.feed(data)
    return drain(p)


def one(cls, line: bytes, utf8: bool = False):
    res = parse(cls, line, utf8=utf8)
    assert len(res) == 1, res
    return res[0]


U, TL, INV = int(Command.UNKNOWN), int(Command.TOO_LONG), int(Command.INVALID)


# ---------------------------------------------------------------- the two implementations


def test_twin_is_the_module_asked_for(twin):
    mod = twin(PARSER)
    if mod.__name__ == PARSER:
        assert mod.__file__.endswith((".so", ".pyd")), mod.__file__
    else:
        assert mod.__name__ == _compiled.TWINS[PARSER]
        assert mod.__file__.endswith(".py"), mod.__file__


def test_parser_module_selection(monkeypatch, twin):
    """fastpop.wire.parser takes the compiled parser unless FASTPOP_NO_EXTENSIONS is set."""
    import fastpop.wire.parser as parser_mod

    mod = twin(PARSER)
    compiled = mod.__name__ == PARSER
    loaded = dict(_compiled.LOADED)
    try:
        if compiled:
            monkeypatch.delenv("FASTPOP_NO_EXTENSIONS", raising=False)
        else:
            monkeypatch.setenv("FASTPOP_NO_EXTENSIONS", "1")
        importlib.reload(_compiled)  # it reads the variable when imported
        importlib.reload(parser_mod)
        assert parser_mod.PARSER_IMPL == ("cython" if compiled else "python")
        assert parser_mod.CommandParser is mod.CommandParser
    finally:
        monkeypatch.undo()
        importlib.reload(_compiled)
        _compiled.LOADED.update(loaded)
        importlib.reload(parser_mod)


def test_keyword_table_is_complete():
    assert set(KEYWORDS) == {
        b"USER", b"PASS", b"APOP", b"QUIT", b"STAT", b"LIST", b"RETR", b"DELE",
        b"NOOP", b"RSET", b"TOP", b"UIDL", b"CAPA", b"AUTH", b"STLS", b"UTF8",
        b"LAST",  # RFC 1460's, answered only with [pop3] last on
    }
    assert all(KEYWORDS[k] == Command[k.decode()] for k in KEYWORDS)
    assert REST_OF_LINE == {Command.PASS}


# ---------------------------------------------------------------- framing


def test_crlf_framing(P):
    assert parse(P, b"USER alice\r\nPASS secret\r\nSTAT\r\nQUIT\r\n") == [
        (Command.USER, ("alice",)),
        (Command.PASS, ("secret",)),
        (Command.STAT, ()),
        (Command.QUIT, ()),
    ]


def test_bare_lf_and_mixed_framing(P):
    assert parse(P, b"USER alice\nPASS secret\r\nLIST 2\nQUIT\r\n") == [
        (Command.USER, ("alice",)),
        (Command.PASS, ("secret",)),
        (Command.LIST, ("2",)),
        (Command.QUIT, ()),
    ]


def test_incomplete_line_waits(P):
    p = P()
    p.feed(b"USER ali")
    assert p.next_command() is None
    assert p.buffered == 8
    p.feed(b"ce\r")
    assert p.next_command() is None
    p.feed(b"\nNO")
    assert p.next_command() == (Command.USER, ("alice",))
    assert p.next_command() is None
    assert p.buffered == 2
    p.feed(b"OP\r\n")
    assert p.next_command() == (Command.NOOP, ())
    assert p.next_command() is None
    assert p.buffered == 0


def test_no_input_gives_none(P):
    p = P()
    assert p.next_command() is None
    assert p.next_line() is None
    p.feed(b"")
    assert p.next_command() is None
    assert p.buffered == 0


STREAM = b"USER alice\r\nPASS s e c r e t \r\nLIST\nTOP 1  10\r\nretr 3\r\n\r\nXTND\r\nQUIT\r\n"
STREAM_RESULT = [
    (Command.USER, ("alice",)),
    (Command.PASS, ("s e c r e t ",)),
    (Command.LIST, ()),
    (Command.TOP, ("1", "10")),
    (Command.RETR, ("3",)),
    (U, ()),
    (U, ()),
    (Command.QUIT, ()),
]


def test_split_at_every_byte_position(P):
    assert parse(P, STREAM) == STREAM_RESULT
    for i in range(len(STREAM) + 1):
        p = P()
        p.feed(STREAM[:i])
        got = drain(p)
        p.feed(STREAM[i:])
        got += drain(p)
        assert got == STREAM_RESULT, i
        assert p.buffered == 0


def test_split_at_every_pair_of_positions(P):
    data = b"TOP 12 3\r\nPASS a b\r\n"
    want = [(Command.TOP, ("12", "3")), (Command.PASS, ("a b",))]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            p = P()
            got = []
            for chunk in (data[:i], data[i:j], data[j:]):
                p.feed(chunk)
                got += drain(p)
            assert got == want, (i, j)


def test_byte_at_a_time(P):
    p = P()
    got = []
    for b in STREAM:
        p.feed(bytes([b]))
        got += drain(p)
    assert got == STREAM_RESULT


def test_many_pipelined_commands_in_one_chunk(P):
    lines = []
    want = []
    for i in range(1, 1001):
        lines.append(b"RETR %d\r\n" % i if i % 2 else b"dele %d\n" % i)
        want.append((Command.RETR, (str(i),)) if i % 2 else (Command.DELE, (str(i),)))
    p = P()
    p.feed(b"".join(lines) + b"QUI")
    assert drain(p) == want
    assert p.buffered == 3
    p.feed(b"T\r\n")
    assert drain(p) == [(Command.QUIT, ())]


def test_feed_accepts_bytes_like(P):
    p = P()
    p.feed(bytearray(b"USER a\r\n"))
    p.feed(memoryview(b"NOOP\r\n"))
    assert drain(p) == [(Command.USER, ("a",)), (Command.NOOP, ())]


def test_feed_copies_mutable_input(P):
    p = P()
    buf = bytearray(b"USER abc")
    p.feed(buf)
    buf[:] = b"XXXXXXXX"
    p.feed(b"\r\n")
    assert drain(p) == [(Command.USER, ("abc",))]


# ---------------------------------------------------------------- keywords


@pytest.mark.parametrize("kw", sorted(KEYWORDS), ids=lambda k: k.decode())
def test_every_keyword(P, kw):
    code = KEYWORDS[kw]
    variants = {kw, kw.lower(), kw.capitalize(), kw.swapcase(), kw[:1].lower() + kw[1:]}
    for v in variants:
        assert one(P, v + b"\r\n") == (code, ()), v
        assert one(P, v + b"\n") == (code, ()), v
        assert one(P, v + b" \r\n") == (code, ()), v
        assert one(P, v + b" arg1\r\n") == (code, ("arg1",)), v
        # the keyword must be the whole first word
        assert one(P, v + b"X arg\r\n") == (U, ()), v
        assert one(P, v[:-1] + b" arg\r\n") == (U, ()), v


def test_case_insensitive_keywords(P):
    assert parse(P, b"user Bob\r\nUsEr Bob\r\nuSER Bob\r\n") == [(Command.USER, ("Bob",))] * 3
    # arguments keep their case
    assert one(P, b"apop MixedCase AbCdEf\r\n") == (Command.APOP, ("MixedCase", "AbCdEf"))


@pytest.mark.parametrize(
    "line",
    [
        b"USERS a", b"USERX", b"QUITQUIT", b"TOPS 1 2", b"XTND XMIT", b"STATS",
        b"US a", b"U", b"TO 1 2", b"QU", b"AB", b"A",
        b"LASTS", b"XYZ", b"1234", b"TOP1 2", b"US ER", b"@@@@",
    ],
)
def test_unknown_keywords(P, line):
    assert one(P, line + b"\r\n") == (U, ())


@pytest.mark.parametrize(
    "line, want",
    [
        # Forms clients send with a trailing blank (Outlook's "AUTH " asks for
        # the mechanisms, as a bare AUTH): the same command as without it.
        (b"AUTH ", (Command.AUTH, ())),
        (b"AUTH  ", (Command.AUTH, ())),
        (b"auth ", (Command.AUTH, ())),
        (b"AUTH PLAIN ", (Command.AUTH, ("PLAIN",))),
        (b"AUTH PLAIN dGVzdA== ", (Command.AUTH, ("PLAIN", "dGVzdA=="))),
        (b"CAPA ", (Command.CAPA, ())),
        (b"STAT ", (Command.STAT, ())),
        (b"UIDL 1 ", (Command.UIDL, ("1",))),
        (b"RETR 1 ", (Command.RETR, ("1",))),
        (b"LAST ", (Command.LAST, ())),
        (b"QUIT ", (Command.QUIT, ())),
        (b"USER bob ", (Command.USER, ("bob",))),
    ],
)
def test_trailing_blank_is_harmless(P, line, want):
    assert one(P, line + b"\r\n") == want
    assert one(P, line + b"\n") == want


def test_last_is_a_keyword(P):
    assert parse(P, b"LAST\r\nlast\r\nLaSt\r\n") == [(Command.LAST, ())] * 3


def test_leading_space_is_unknown(P):
    assert one(P, b" USER a\r\n") == (U, ())
    assert one(P, b" \r\n") == (U, ())


def test_empty_line_is_unknown(P):
    assert parse(P, b"\r\n\n\r\n") == [(U, ())] * 3


def test_parsing_continues_after_unknown_and_invalid(P):
    assert parse(P, b"FOO\r\nUSER a\x01\r\n\r\nNOOP\r\n") == [(U, ()), (INV, ()), (U, ()), (Command.NOOP, ())]


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "line, want",
    [
        (b"TOP 1 2", (Command.TOP, ("1", "2"))),
        (b"TOP  1   2  ", (Command.TOP, ("1", "2"))),
        (b"TOP 1 2 3 4", (Command.TOP, ("1", "2", "3", "4"))),
        (b"LIST ", (Command.LIST, ())),
        (b"LIST      ", (Command.LIST, ())),
        (b"USER a b", (Command.USER, ("a", "b"))),
        (b"USER     bob    ", (Command.USER, ("bob",))),
        (b"APOP mrose c4c9334bac560ecc979e58001b3e22fb", (Command.APOP, ("mrose", "c4c9334bac560ecc979e58001b3e22fb"))),
        (b"AUTH PLAIN dGVzdAB0ZXN0AHBhc3M=", (Command.AUTH, ("PLAIN", "dGVzdAB0ZXN0AHBhc3M="))),
        (b"AUTH  PLAIN  x ", (Command.AUTH, ("PLAIN", "x"))),
        (b"UTF8 x", (Command.UTF8, ("x",))),
        (b"UIDL 007", (Command.UIDL, ("007",))),
    ],
)
def test_argument_splitting(P, line, want):
    assert one(P, line + b"\r\n") == want
    assert one(P, line + b"\n") == want


@pytest.mark.parametrize(
    "line, want",
    [
        (b"PASS secret", ("secret",)),
        (b"PASS my secret pass", ("my secret pass",)),
        (b"PASS  two  spaces  ", (" two  spaces  ",)),
        (b"PASS a", ("a",)),
        (b"PASS  ", (" ",)),
        (b"PASS :;!@#$%^&*()=+ x", (":;!@#$%^&*()=+ x",)),
        (b"pass lower", ("lower",)),
        (b"PASS ", ()),
        (b"PASS", ()),
    ],
)
def test_pass_keeps_rest_of_line(P, line, want):
    assert one(P, line + b"\r\n") == (Command.PASS, want)
    assert one(P, line + b"\n") == (Command.PASS, want)


def test_only_the_line_terminating_crlf_is_stripped(P):
    # the CR of CRLF goes, nothing else: a trailing space stays in PASS
    assert one(P, b"PASS x \r\n") == (Command.PASS, ("x ",))


# ---------------------------------------------------------------- invalid octets

BAD_ASCII = [b for b in range(256) if b != 10 and (b < 32 or b >= 127)]


def test_invalid_octets_in_ascii_mode(P):
    for b in BAD_ASCII:
        c = bytes([b])
        for line in (b"USER a" + c + b"b", c + b"USER a", b"PASS pa" + c + b"ss", b"XYZ" + c, c, b"NOOP " + c):
            p = P()
            p.feed(line + b"\r\nNOOP\r\n")
            assert drain(p) == [(INV, ()), (Command.NOOP, ())], line


def test_tab_and_bare_cr_inside_line_are_invalid(P):
    assert one(P, b"USER\ta\r\n") == (INV, ())
    assert one(P, b"USER a\rb\r\n") == (INV, ())
    assert one(P, b"USER a\r\r\n") == (INV, ())  # only one CR belongs to the terminator
    assert one(P, b"\rUSER a\n") == (INV, ())
    assert one(P, b"\r\r\n") == (INV, ())
    assert one(P, b"\r\n") == (U, ())


def test_control_octets_invalid_in_utf8_mode(P):
    for b in [b for b in range(32) if b != 10] + [0x7F]:
        assert one(P, b"USER j\xc3\xb6rg" + bytes([b]) + b"\r\n", utf8=True) == (INV, ()), b


def test_lone_high_octet_invalid_in_utf8_mode(P):
    # a single octet >= 0x80 between ASCII octets is never valid UTF-8
    for b in range(0x80, 0x100):
        assert one(P, b"USER a" + bytes([b]) + b"b\r\n", utf8=True) == (INV, ()), b


# ---------------------------------------------------------------- UTF-8 mode


@pytest.mark.parametrize(
    "line, want",
    [
        ("USER jörg", (Command.USER, ("jörg",))),
        ("USER ユーザー@例え.jp", (Command.USER, ("ユーザー@例え.jp",))),
        ("PASS pässwörd mit  Leerzeichen 🔑", (Command.PASS, ("pässwörd mit  Leerzeichen 🔑",))),
        ("APOP ñandú 0123456789abcdef", (Command.APOP, ("ñandú", "0123456789abcdef"))),
        ("TOP 1 2", (Command.TOP, ("1", "2"))),
        ("ÜSER x", (U, ())),
        ("USÉR x", (U, ())),
        ("€", (U, ())),
    ],
)
def test_utf8_mode_decodes(P, line, want):
    data = line.encode("utf-8") + b"\r\n"
    assert one(P, data, utf8=True) == want
    assert one(P, data, utf8=False) == ((INV, ()) if any(ord(c) > 127 for c in line) else want)


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff", b"\xfe", b"\x80", b"\xbf",  # not a lead octet
        b"\xc3",  # truncated 2-octet sequence
        b"\xe2\x82",  # truncated 3-octet sequence
        b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\xaf",  # overlong
        b"\xed\xa0\x80", b"\xed\xbf\xbf",  # UTF-16 surrogates
        b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80",  # above U+10FFFF
        b"\xc3 \xa9",  # sequence split by a space
    ],
)
def test_invalid_utf8_rejected(P, bad):
    for line in (b"USER a" + bad, b"PASS x" + bad + b" y", bad + b"USER", b"ZZZZ " + bad):
        p = P()
        p.utf8 = True
        p.feed(line + b"\r\nUSER ok\r\n")
        assert drain(p) == [(INV, ()), (Command.USER, ("ok",))], line


def test_utf8_flag_applies_when_the_line_is_parsed(P):
    p = P()
    assert not p.utf8
    p.feed("USER jörg\r\nUSER jörg\r\n".encode())
    assert p.next_command() == (INV, ())
    p.utf8 = True
    assert bool(p.utf8) is True
    assert p.next_command() == (Command.USER, ("jörg",))
    p.utf8 = False
    p.feed("USER jörg\r\n".encode())
    assert p.next_command() == (INV, ())


def test_utf8_multibyte_split_across_feeds(P):
    data = "PASS ünïcödé ✓\r\n".encode()
    for i in range(len(data) + 1):
        p = P()
        p.utf8 = True
        p.feed(data[:i])
        got = drain(p)
        p.feed(data[i:])
        got += drain(p)
        assert got == [(Command.PASS, ("ünïcödé ✓",))], i


# ---------------------------------------------------------------- line length limit


def user_line(total: int, ending: bytes = b"\r\n") -> bytes:
    """A USER line of exactly ``total`` octets including its terminator."""
    line = b"USER " + b"u" * (total - 5 - len(ending)) + ending
    assert len(line) == total
    return line


def test_default_limit_is_rfc2449():
    assert MAX_COMMAND_LINE == 255


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_line_exactly_at_limit_accepted(P, ending):
    line = user_line(255, ending)
    assert parse(P, line) == [(Command.USER, ("u" * (255 - 5 - len(ending)),))]
    # also when it trickles in
    p = P()
    got = []
    for b in line:
        p.feed(bytes([b]))
        got += drain(p)
    assert got == [(Command.USER, ("u" * (255 - 5 - len(ending)),))]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_line_one_over_limit_rejected_once(P, ending):
    line = user_line(256, ending)
    assert parse(P, line + b"NOOP\r\n") == [(TL, ()), (Command.NOOP, ())]
    p = P()
    got = []
    for b in line + b"NOOP\r\n":
        p.feed(bytes([b]))
        got += drain(p)
        assert p.buffered < 255
    assert got == [(TL, ()), (Command.NOOP, ())]


def test_pass_at_limit(P):
    pw = b"p w" * 100
    pw = pw[: 255 - 7]
    assert one(P, b"PASS " + pw + b"\r\n") == (Command.PASS, (pw.decode(),))
    assert one(P, b"PASS " + pw + b"x\r\n") == (TL, ())


def test_unterminated_line_reported_as_soon_as_it_cannot_fit(P):
    p = P()
    p.feed(b"USER " + b"u" * 249)  # 254 octets: could still end in a bare LF
    assert p.next_command() is None
    p.feed(b"u")  # 255 octets and no terminator yet: can no longer fit
    assert p.next_command() == (TL, ())
    assert p.next_command() is None
    assert p.buffered == 0
    p.feed(b"uuuu\r\nNOOP\r\n")
    assert drain(p) == [(Command.NOOP, ())]


def test_cr_at_limit_boundary(P):
    p = P()
    p.feed(b"USER " + b"u" * 248 + b"\r")  # 254 octets, CRLF would make 255
    assert p.next_command() is None
    p.feed(b"\n")
    assert drain(p) == [(Command.USER, ("u" * 248,))]


def test_overlong_line_in_small_chunks_reported_once_and_not_buffered(P):
    junk = b"USER " + b"x" * 20000 + b" QUIT\r\n"  # the QUIT is part of the overlong line
    tail = b"STAT\r\nQUIT\r\n"
    data = junk + tail
    for size in (1, 7, 100, 254, 255, 256, 1000):
        p = P()
        got = []
        peak = 0
        for i in range(0, len(data), size):
            p.feed(data[i : i + size])
            peak = max(peak, p.buffered)
            got += drain(p)
            peak = max(peak, p.buffered)
        assert got == [(TL, ()), (Command.STAT, ()), (Command.QUIT, ())], size
        assert peak < 255 + size, (size, peak)


def test_overlong_line_buffer_released_after_report(P):
    p = P()
    p.feed(b"A" * 1000)
    assert p.next_command() == (TL, ())
    assert p.buffered == 0
    for _ in range(100):
        p.feed(b"B" * 1000)
        assert p.buffered == 0
        assert p.next_command() is None
    p.feed(b"QUIT\r\nNOOP\r\n")  # "QUIT" ends the overlong line
    assert drain(p) == [(Command.NOOP, ())]


def test_consecutive_overlong_lines_each_reported_once(P):
    data = (b"L" * 300 + b"\r\n") * 3 + b"\n" + b"M" * 500 + b"\nRSET\r\n"
    want = [(TL, ())] * 3 + [(U, ()), (TL, ()), (Command.RSET, ())]
    assert parse(P, data) == want
    for size in (1, 3, 64, 299, 301):
        p = P()
        got = []
        for i in range(0, len(data), size):
            p.feed(data[i : i + size])
            got += drain(p)
        assert got == want, size


def test_custom_max_line(P):
    p = P(max_line=10)
    assert p.max_line == 10
    p.feed(b"USER abc\r\n" + b"USER abcd\r\n" + b"USER abcd\n" + b"NOOP\r\n")
    assert drain(p) == [(Command.USER, ("abc",)), (TL, ()), (Command.USER, ("abcd",)), (Command.NOOP, ())]
    p.max_line = 12
    p.feed(b"USER abcde\r\n")
    assert drain(p) == [(Command.USER, ("abcde",))]


# ---------------------------------------------------------------- SASL continuation lines


def test_next_line_returns_raw_line(P):
    p = P()
    p.feed(b"dGVzdAB0ZXN0AHBhc3M=\r\n*\n\r\n\x00\xff raw \t\r\n")
    assert p.next_line() == (True, b"dGVzdAB0ZXN0AHBhc3M=")
    assert p.next_line() == (True, b"*")
    assert p.next_line() == (True, b"")
    assert p.next_line() == (True, b"\x00\xff raw \t")
    assert p.next_line() is None


def test_next_line_waits_for_terminator(P):
    p = P()
    p.feed(b"abc")
    assert p.next_line() is None
    p.feed(b"def\r")
    assert p.next_line() is None
    p.feed(b"\nSTAT\r\n")
    assert p.next_line() == (True, b"abcdef")
    assert p.next_command() == (Command.STAT, ())


def test_next_line_has_its_own_larger_limit(P):
    assert MAX_CONTINUATION_LINE > MAX_COMMAND_LINE
    token = b"A" * 5000
    p = P()
    p.feed(token + b"\r\n" + token + b"\r\n")
    assert p.next_line() == (True, token)
    assert p.next_command() == (TL, ())


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_next_line_limit_boundary(P, ending):
    limit = MAX_CONTINUATION_LINE
    ok = b"B" * (limit - len(ending))
    p = P()
    p.feed(ok + ending + ok + b"B" + ending + b"NEXT\r\n")
    assert p.next_line() == (True, ok)
    assert p.next_line() == (False, b"")
    assert p.next_line() == (True, b"NEXT")
    assert p.next_line() is None


def test_next_line_overlong_in_chunks_reported_once(P):
    p = P(max_continuation=100)
    assert p.max_continuation == 100
    got = []
    peak = 0
    data = b"C" * 5000 + b"\r\nabc\r\n"
    for i in range(0, len(data), 9):
        p.feed(data[i : i + 9])
        while (r := p.next_line()) is not None:
            got.append(r)
        peak = max(peak, p.buffered)
    assert got == [(False, b""), (True, b"abc")]
    assert peak < 100 + 9


def test_discard(P):
    p = P()
    p.feed(b"USER a\r\nPASS b\r\nSTA")
    assert p.next_command() == (Command.USER, ("a",))
    p.discard()
    assert p.buffered == 0
    assert p.next_command() is None
    p.feed(b"T\r\nCAPA\r\n")
    assert drain(p) == [(U, ()), (Command.CAPA, ())]


def test_discard_ends_skipping_of_overlong_line(P):
    p = P()
    p.feed(b"Z" * 400)
    assert p.next_command() == (TL, ())
    p.discard()
    p.feed(b"QUIT\r\n")
    assert drain(p) == [(Command.QUIT, ())]


def test_discard_on_empty_parser(P):
    p = P()
    p.discard()
    p.feed(b"NOOP\n")
    assert drain(p) == [(Command.NOOP, ())]


# ---------------------------------------------------------------- property tests

TOKENS = (
    [k for k in KEYWORDS]
    + [k.lower() for k in KEYWORDS]
    + [b"USERX", b"XTND", b"PAS", b"TO"]
    + [b" ", b" ", b" ", b"  ", b"\r", b"\n", b"\n", b"\r\n", b"\r\n", b"\r\n"]
    + [b"0", b"1", b"42", b"999999"]
    + [b"\x00", b"\t", b"\x7f", b"\x1b", b"\x80", b"\xff", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x94\x91",
       b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]
    + [b"a", b"secret", b"x" * 40, b"Y" * 120]
)
streams = st.lists(
    st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6)), max_size=80
).map(b"".join)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted(min(p, len(data)) for p in points)
    chunks, prev = [], 0
    for q in points + [len(data)]:
        chunks.append(data[prev:q])
        prev = q
    return chunks


def run_ops(cls, ops, max_line, max_cont):
    p = cls(max_line=max_line, max_continuation=max_cont)
    trace = []
    for op in ops:
        kind = op[0]
        if kind == "feed":
            p.feed(op[1])
        elif kind == "utf8":
            p.utf8 = op[1]
        elif kind == "cmd":
            while (r := p.next_command()) is not None:
                assert type(r) is tuple and len(r) == 2 and type(r[1]) is tuple
                assert all(type(a) is str for a in r[1])
                trace.append(("cmd", int(r[0]), r[1]))
        elif kind == "line":
            r = p.next_line()
            trace.append(("line", r))
        elif kind == "discard":
            p.discard()
        trace.append(("buffered", p.buffered))
    return trace


@st.composite
def op_sequences(draw):
    data = draw(streams)
    points = draw(st.lists(st.integers(0, max(len(data), 0)), max_size=10))
    ops = []
    for chunk in cut(data, points):
        if draw(st.integers(0, 5)) == 0:
            ops.append(("utf8", draw(st.booleans())))
        ops.append(("feed", chunk))
        extra = draw(st.integers(0, 12))
        if extra == 0:
            ops.append(("line",))
        elif extra == 1:
            ops.append(("discard",))
        ops.append(("cmd",))
    return ops


@settings(max_examples=300, deadline=None)
@given(ops=op_sequences(), max_line=st.sampled_from([4, 8, 16, 40, 255]), max_cont=st.sampled_from([8, 64, 16384]))
def test_both_implementations_agree(twin_pair, ops, max_line, max_cont):
    c, py = twin_pair(PARSER)
    assert run_ops(c.CommandParser, ops, max_line, max_cont) == run_ops(py.CommandParser, ops, max_line, max_cont)


def reference(data: bytes, utf8: bool, limit: int) -> list:
    """What next_command() must return for ``data`` fed in one piece."""
    out = []
    lines = data.split(b"\n")
    tail = lines.pop()
    for raw in lines:
        if len(raw) + 1 > limit:
            out.append((TL, ()))
            continue
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if any(b < 32 or b == 127 for b in line) or (not utf8 and any(b > 127 for b in line)):
            out.append((INV, ()))
            continue
        try:
            text = line.decode("utf-8" if utf8 else "ascii")
        except UnicodeDecodeError:
            out.append((INV, ()))
            continue
        keyword, sp, rest = text.partition(" ")
        code = KEYWORDS.get(keyword.upper().encode("utf-8"), 0) if keyword.isascii() else 0
        if code == 0 or not sp:
            out.append((code, ()))
        elif code == Command.PASS:
            out.append((code, (rest,) if rest else ()))
        else:
            out.append((code, tuple(a for a in rest.split(" ") if a)))
    if len(tail) >= limit:
        out.append((TL, ()))
    return out


@settings(TWIN_SETTINGS, max_examples=300)
@given(data=streams, utf8=st.booleans(), limit=st.sampled_from([6, 16, 64, 255]))
def test_matches_reference_model(P, data, utf8, limit):
    assert parse(P, data, utf8=utf8, max_line=limit) == reference(data, utf8, limit)


@settings(TWIN_SETTINGS, max_examples=300)
@given(data=st.data(), stream=streams, utf8=st.booleans(), limit=st.sampled_from([6, 16, 64, 255]))
def test_results_independent_of_split(P, data, stream, utf8, limit):
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    whole = parse(P, stream, utf8=utf8, max_line=limit)
    p = P(max_line=limit)
    p.utf8 = utf8
    got = []
    for chunk in cut(stream, points):
        p.feed(chunk)
        got += drain(p)
        assert p.buffered < limit
    assert got == whole
