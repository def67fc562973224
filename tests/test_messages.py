"""Message bytes end to end: dot-stuffing, line ends, sizes, RETR and TOP.

What the server sends is read from a raw socket (poplib would undo the
stuffing) and compared byte for byte with a plain reference of RFC 1939
written here: lone LF becomes CRLF, a bare CR stays, a non-empty message
without a final newline gets CRLF, then every line starting with "." gets
another ".", and ".\\r\\n" ends the reply.  Large messages (> 128 KiB) take
the streaming path, which reads 256 KiB at a time, so dots and line ends are
placed exactly on those boundaries.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

import pytest
from support import server as support_server
from support.server import message

CRLF = b"\r\n"
KiB = 1024
SMALL_LIMIT = 128 * KiB  # larger messages are streamed
CHUNK = 256 * KiB  # streaming read size


# --------------------------------------------------------------------------- the reference


def rfc1939_text(data: bytes) -> bytes:
    """The message as RETR carries it, before dot-stuffing."""
    if not data:
        return b""
    text = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if not text.endswith(b"\n"):
        text += CRLF
    return text


def rfc1939_lines(data: bytes) -> list[bytes]:
    text = rfc1939_text(data)
    return text[:-2].split(CRLF) if text else []


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines)


def retr_body(data: bytes) -> bytes:
    return stuff(rfc1939_lines(data))


def top_body(data: bytes, n: int) -> bytes:
    lines = rfc1939_lines(data)
    if b"" in lines:
        lines = lines[: lines.index(b"") + 1 + n]
    return stuff(lines)


def unstuff(body: bytes) -> bytes:
    """What a client gets back from a stuffed body (terminator already removed)."""
    if not body:
        return b""
    return b"".join((line[1:] if line.startswith(b".") else line) + CRLF for line in body[:-2].split(CRLF))


def assert_same(actual: bytes, expected: bytes, what: str) -> None:
    if actual == expected:
        return
    i = next((k for k in range(min(len(actual), len(expected))) if actual[k] != expected[k]),
             min(len(actual), len(expected)))
    raise AssertionError(
        f"{what}: {len(actual)} octets sent, {len(expected)} expected; first difference at offset {i}: "
        f"sent {actual[max(0, i - 20):i + 20]!r}, expected {expected[max(0, i - 20):i + 20]!r}"
    )


def test_reference_itself():
    # the reference must agree with RFC 1939 on hand-checked cases
    assert retr_body(b"") == b""
    assert retr_body(b"a") == b"a\r\n"
    assert retr_body(b".\n..\n.x") == b"..\r\n...\r\n..x\r\n"
    assert retr_body(b"a\rb\r") == b"a\rb\r\r\n"
    assert retr_body(b"a\r\n\n\r.b\n") == b"a\r\n\r\n\r.b\r\n"
    assert top_body(b"H: 1\n\nb1\nb2\n", 1) == b"H: 1\r\n\r\nb1\r\n"
    assert top_body(b"H: 1\nH: 2\n", 0) == b"H: 1\r\nH: 2\r\n"
    assert unstuff(retr_body(b".\r\n..x\r\nabc")) == rfc1939_text(b".\r\n..x\r\nabc")


# --------------------------------------------------------------------------- messages


def big(size: int, patches: dict[int, bytes] | None = None, header: bytes = b"Subject: big\r\n\r\n") -> bytes:
    """``size`` octets of 72-octet CRLF lines after a header, ending in CRLF, with bytes
    overwritten at the given offsets (after the final CRLF is put in place)."""
    line = b"y" * 70 + CRLF
    data = bytearray(header + line * ((size - len(header)) // len(line) + 1))[:size]
    data[-2:] = CRLF
    for offset, patch in (patches or {}).items():
        assert offset >= len(header) and offset + len(patch) <= size
        data[offset:offset + len(patch)] = patch
    assert len(data) == size
    return bytes(data)


def clean(size: int, dot_lines_at: list[int], header: bytes = b"Subject: clean\r\n\r\n") -> bytes:
    """A message stored with CRLF line ends only (the form that may be sent without
    any transform), with a line starting with "." at each given offset."""
    out = bytearray(header)

    def fill(upto: int) -> None:
        while len(out) < upto:
            gap = upto - len(out)
            n = gap if gap <= 900 else (900 if gap - 900 >= 2 else 800)
            assert n >= 2, "offsets too close together"
            out.extend(b"c" * (n - 2) + CRLF)

    targets = sorted(dot_lines_at) + [size]
    for offset, following in zip(targets, targets[1:], strict=False):
        fill(offset)
        assert len(out) == offset, (offset, len(out))
        out.extend(b".dot line\r\n" if following - offset >= 13 else b".\r\n")
    fill(size)
    assert len(out) == size and out.endswith(CRLF) and rfc1939_text(bytes(out)) == bytes(out)
    return bytes(out)


def big_header(blank_at: int, size: int = 300 * KiB) -> bytes:
    """A header of ``blank_at`` octets (ending in CRLF), a blank line, then a body with dots."""
    first = b"Subject: long header\r\n"
    field = b"X-Filler: " + b"h" * 60 + CRLF
    rest = blank_at - len(first)
    header = first + field * (rest // len(field)) + b"X: " + b"z" * (rest % len(field) - 5) + CRLF
    assert len(header) == blank_at
    body = (b"body line\r\n.dot line\r\n" * (size // 20))
    return (header + CRLF + body)[: size - 2] + CRLF


SMALL_CASES = {
    "dot-lines": b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\n...\r\nend\r\n",
    "dot-on-line-1": b".Subject: leading dot\r\n\r\nbody\r\n",
    "only-dot": b".",
    "only-dot-line": b".\r\n",
    "ends-with-dot-line": b"Subject: x\r\n\r\nbody\r\n.\r\n",
    "ends-with-dot-no-newline": b"Subject: x\r\n\r\nbody\r\n.",
    "bare-lf": b"Subject: lf\n\nline 1\n.dot\n..two\nlast\n",
    "bare-lf-blank-lines": b"\n\n\n",
    "bare-cr": b"Subject: cr\r\n\r\na\rb\r.c\r\n\r.d\r\n",
    "cr-at-end": b"Subject: cr\r\n\r\nbody\r",
    "cr-cr-lf": b"Subject: x\r\n\r\na\r\r\n.b\r\r\n",
    "mixed-line-ends": b"A: 1\n\r\nb\r\rc\n\r\n.\n\r.d\n.e\r\n",
    "no-final-newline": b"Subject: x\r\n\r\nlast line",
    "nul-and-8bit": b"Subject: caf\xc3\xa9\r\n\r\n\x00\x01\xff\xfe\r\n.\x00\r\n\x80.\r\n",
    "empty": b"",
    "single-lf": b"\n",
    "single-crlf": b"\r\n",
    "only-blank-lines": b"\r\n\r\n\r\n",
    "header-only": b"Subject: no body\r\nX: y\r\n",
    "body-starts-with-blank": b"\r\nbody right away\r\n.dot\r\n",
}

LARGE_CASES = {
    # dots right after a line end, exactly at the 128 KiB and the 256 KiB chunk boundaries
    "dot-after-lf-at-boundaries": big(700 * KiB, {SMALL_LIMIT - 1: b"\n.", CHUNK - 1: b"\n.", 2 * CHUNK - 1: b"\n."}),
    "dot-after-crlf-at-boundaries": big(700 * KiB,
                                        {SMALL_LIMIT - 2: b"\r\n.", CHUNK - 2: b"\r\n..", 2 * CHUNK - 2: b"\r\n.\r\n"}),
    "dot-before-boundary": big(300 * KiB, {CHUNK - 3: b"\r\n.", SMALL_LIMIT - 2: b"\n."}),
    # CR as the last octet of a chunk, LF as the first of the next
    "crlf-split-by-boundary": big(600 * KiB, {CHUNK - 1: b"\r\n.", 2 * CHUNK - 1: b"\r\n\r\n."}),
    # a bare CR ends the chunk, so a dot opening the next one is not at a line start
    "cr-then-dot-across-boundary": big(300 * KiB, {CHUNK - 1: b"\r.x"}),
    "lf-cr-then-dot-across-boundary": big(300 * KiB, {CHUNK - 2: b"\n\r.y"}),
    "bare-lf-at-boundary": big(300 * KiB, {CHUNK - 1: b"\n\n."}),
    "ends-with-dot-line-at-boundary": big(2 * CHUNK + 3, {2 * CHUNK - 2: b"\r\n.\r\n"}),
    "ends-exactly-at-chunk": big(CHUNK, {CHUNK - 3: b"\r\n."}),
    "ends-exactly-at-chunk-with-lf": big(CHUNK, {CHUNK - 2: b".\n"}),
    "cr-at-end-exactly-at-chunk": big(CHUNK, {CHUNK - 1: b"\r"}),
    "cr-at-end": big(300 * KiB, {300 * KiB - 1: b"\r"}),
    "no-final-newline": big(300 * KiB, {300 * KiB - 4: b"\r\n.x"}),
    "all-bare-lf": big(500 * KiB).replace(CRLF, b"\n.\n")[: 500 * KiB - 1] + b"\n",
    "exactly-128k-small-path": big(SMALL_LIMIT, {SMALL_LIMIT - 3: b"\n.\n"}),
    "128k-plus-1-streamed": big(SMALL_LIMIT + 1, {SMALL_LIMIT - 3: b"\n.\r\n"}),
    "dot-at-128k-streamed": big(SMALL_LIMIT + 3, {SMALL_LIMIT - 1: b"\n.\r\n"}),
    "ends-with-dot-line-at-chunk-end": big(CHUNK, {CHUNK - 5: b"\r\n.\r\n"}),
    "nul-and-8bit": big(400 * KiB, {CHUNK - 1: b"\n.\x00\xff\r\n", 200 * KiB: b"\x00" * 100 + b"\xfe" * 100}),
    # stored CRLF-clean (sent untransformed but for the stuffing dots)
    "clean-dot-lines-at-boundaries": clean(600 * KiB, [SMALL_LIMIT - 3, SMALL_LIMIT, CHUNK - 3, CHUNK,
                                                     CHUNK + 11, 2 * CHUNK - 3, 2 * CHUNK]),
    "clean-dot-at-first-octet": clean(300 * KiB, [0, 3, CHUNK], header=b""),
    "clean-dot-on-line-1": big(300 * KiB, header=b".Subject: dot\r\n\r\n"),
    "clean-ends-with-dot-line": clean(300 * KiB, [300 * KiB - 3]),
    "clean-ends-with-dot-line-at-chunk": clean(CHUNK, [CHUNK - 3]),
    "clean-no-dots": big(400 * KiB),
    "clean-many-dots": clean(700 * KiB, list(range(18, 700 * KiB - 20, 997))),
    "clean-128k-plus-1": clean(SMALL_LIMIT + 1, [SMALL_LIMIT - 10]),
    # the blank line ending the header straddles the chunk boundary in every possible way
    **{f"blank-line-at-chunk{k:+d}": big_header(CHUNK + k) for k in (-4, -3, -2, -1, 0, 1, 2)},
}

CASES = {**SMALL_CASES, **{"large-" + k: v for k, v in LARGE_CASES.items()}}
NEXT = b"Subject: next\r\n\r\n.after\r\n"


# --------------------------------------------------------------------------- raw client


class Raw(support_server.Raw):
    def __init__(self, port: int, timeout: float = 10):
        super().__init__(port, timeout)
        assert self.greeting.startswith(b"+OK ")


def raw_login(server, user) -> Raw:
    c = Raw(server.port)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    return c


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(CASES))
def test_retr_top_and_sizes(server, case):
    """Message 1 is stored under a plain name, message 2 (same content) with
    S= and W= sizes in its name; both must be sized and sent alike."""
    data = CASES[case]
    user = server.add_user()
    user.deliver(data)
    user.deliver(data, sizes_in_name=True)
    user.deliver(NEXT, sizes_in_name=True)
    size = len(rfc1939_text(data))
    c = raw_login(server, user)

    for n, how in ((1, "plain name"), (2, "S=/W= in name")):
        status = c.cmd(f"RETR {n}")
        body = c.body()
        assert_same(body, retr_body(data), f"RETR {n} ({how})")
        assert status == b"+OK %d octets\r\n" % len(unstuff(body)), (
            f"RETR {n} ({how}): status size differs from octets sent")
        assert len(unstuff(body)) == size
        assert c.cmd(f"LIST {n}") == b"+OK %d %d\r\n" % (n, size), how
        for lines in (0, 1, 2, 99999999):
            assert c.cmd(f"TOP {n} {lines}") == b"+OK Top of message follows\r\n"
            assert_same(c.body(), top_body(data, lines), f"TOP {n} {lines} ({how})")
    total = 2 * size + len(NEXT)
    assert c.cmd("STAT") == b"+OK 3 %d\r\n" % total
    assert c.cmd("LIST") == b"+OK 3 messages (%d octets)\r\n" % total
    assert c.body() == b"1 %d\r\n2 %d\r\n3 %d\r\n" % (size, size, len(NEXT))

    # the session is still in step: the next message comes out whole
    assert c.cmd("RETR 3") == b"+OK %d octets\r\n" % len(NEXT)
    assert c.body() == b"Subject: next\r\n\r\n..after\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out.\r\n"
    c.close()
    assert user.contents() == sorted([data, data, NEXT])


@pytest.mark.parametrize("sizes_in_name", [False, True], ids=["plain-name", "sizes-in-name"])
def test_empty_message_exact_bytes(server, sizes_in_name):
    user = server.add_user()
    user.deliver(b"", sizes_in_name=sizes_in_name)
    c = raw_login(server, user)
    c.sock.sendall(b"LIST\r\nLIST 1\r\nSTAT\r\nRETR 1\r\nTOP 1 0\r\nTOP 1 99999999\r\nNOOP\r\n")
    expected = (
        b"+OK 1 messages (0 octets)\r\n1 0\r\n.\r\n"
        b"+OK 1 0\r\n"
        b"+OK 1 0\r\n"
        b"+OK 0 octets\r\n.\r\n"
        b"+OK Top of message follows\r\n.\r\n"
        b"+OK Top of message follows\r\n.\r\n"
        b"+OK\r\n"
    )
    while len(c.buf) < len(expected):
        c._fill()
    assert bytes(c.buf) == expected
    c.close()


def test_top_line_counts(server):
    body = b"".join(b"line %d\r\n" % i for i in range(1, 11))
    data = b"Subject: lines\r\nX-Two: 2\r\n\r\n" + body
    large = b"Subject: lines\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(1, 40000))
    assert len(large) > SMALL_LIMIT
    user = server.add_user(messages=[data, large])
    c = raw_login(server, user)
    for n, want in ((0, b""), (1, b"line 1\r\n"), (3, b"line 1\r\nline 2\r\nline 3\r\n"), (10, body), (11, body),
                    (99999999, body), (2**31, body), (10**30, body)):
        assert c.cmd(f"TOP 1 {n}") == b"+OK Top of message follows\r\n"
        assert c.body() == b"Subject: lines\r\nX-Two: 2\r\n\r\n" + want, n
    for n in (0, 1, 2, 39998, 39999, 40000, 99999999):
        assert c.cmd(f"TOP 2 {n}") == b"+OK Top of message follows\r\n"
        got = c.body()
        assert_same(got, top_body(large, n), f"TOP 2 {n}")
        assert got.count(CRLF) == 2 + min(n, 39999)
    c.close()


def test_20mb_message_through_poplib(server):
    data = message("twenty megabytes", size=20 * 1024 * 1024)
    user = server.add_user(messages=[data])
    p = user.login()
    expected = rfc1939_text(data)
    assert p.stat() == (1, len(expected))
    resp, lines, _ = p.retr(1)
    assert resp == b"+OK %d octets" % len(expected)
    got = b"\r\n".join(lines) + b"\r\n"
    assert len(got) == len(expected)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
    resp, lines, _ = p.top(1, 0)
    assert lines == [b"From: a@example.com", b"To: b@example.com", b"Subject: twenty megabytes", b""]
    assert p.quit() == b"+OK Logging out."


@pytest.mark.parametrize("size", [100, 300 * KiB], ids=["small", "large"])
def test_message_file_removed_after_login(server, size):
    m1, m2 = message("gone", size=size), message("stays")
    user = server.add_user(messages=[m1, m2])
    c = raw_login(server, user)
    assert c.cmd("STAT").startswith(b"+OK 2 ")
    gone = [p for p in (user.maildir / "cur").iterdir() if p.read_bytes() == m1]
    assert len(gone) == 1
    gone[0].unlink()
    for cmd in ("RETR 1", "TOP 1 0", "TOP 1 99999999"):
        assert c.cmd(cmd) == b"-ERR [SYS/PERM] Message was removed by another program.\r\n", cmd
    assert c.cmd("NOOP") == b"+OK\r\n"
    assert c.cmd("RETR 2") == b"+OK %d octets\r\n" % len(m2)
    assert c.body() == retr_body(m2)
    assert c.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert c.cmd("QUIT") == b"+OK Logging out, messages deleted.\r\n"
    c.close()
    assert user.contents() == [m2]
    # the server goes on serving the mailbox
    c = login_when_free(server, user)
    assert c.cmd("STAT") == b"+OK 1 %d\r\n" % len(m2)
    c.close()


def login_when_free(server, user, timeout: float = 5) -> Raw:
    """raw_login, retrying while the session just closed still holds the lock."""
    deadline = time.monotonic() + timeout
    while True:
        c = Raw(server.port)
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
        reply = c.cmd(f"PASS {user.password}")
        if reply == b"+OK Logged in.\r\n":
            return c
        c.close()
        assert reply.startswith(b"-ERR [IN-USE]") and time.monotonic() < deadline, reply
        time.sleep(0.05)


def test_size_counted_across_chunk_boundary_crlf(server):
    """A CRLF split between two 256 KiB reads is one line end, not a bare LF."""
    data = big(CHUNK + 100, {CHUNK - 1: b"\r\n"})
    user = server.add_user(messages=[data])
    p = user.login()
    assert p.stat() == (1, len(rfc1939_text(data)))
    assert p.list(1) == b"+OK 1 %d" % len(rfc1939_text(data))
    p.quit()
    assert os.path.getsize(user.files()[0]) == len(data)


@pytest.mark.parametrize("case",
                         ["clean-dot-lines-at-boundaries", "clean-dot-at-first-octet", "dot-after-lf-at-boundaries",
                                  "no-final-newline"])
def test_pipelined_large_retr(server, case):
    """Replies to commands sent behind a large RETR come after its last octet, in order."""
    data = LARGE_CASES[case]
    small = b"Subject: small\r\n\r\n.x\r\n"
    user = server.add_user(messages=[data, small])
    c = raw_login(server, user)
    c.sock.sendall(b"RETR 1\r\nRETR 2\r\nRETR 1\r\nTOP 1 2\r\nLIST 1\r\nNOOP\r\n")
    size = len(rfc1939_text(data))
    retr1 = b"+OK %d octets\r\n" % size + retr_body(data) + b".\r\n"
    expected = (
        retr1
        + b"+OK %d octets\r\n" % len(small) + b"Subject: small\r\n\r\n..x\r\n.\r\n"
        + retr1
        + b"+OK Top of message follows\r\n" + top_body(data, 2) + b".\r\n"
        + b"+OK 1 %d\r\n" % size
        + b"+OK\r\n"
    )
    while len(c.buf) < len(expected):
        c._fill()
    assert_same(bytes(c.buf), expected, "pipelined replies")
    c.close()


def test_crlf_clean_message_across_16mib(server):
    """A large CRLF-clean message with dot lines at the first octet and around 16 MiB."""
    mib16 = 16 * 1024 * 1024
    data = clean(mib16 + 300 * KiB, [0, 3, mib16 - 3, mib16, mib16 + CHUNK], header=b"")
    user = server.add_user(messages=[data])
    c = raw_login(server, user)
    assert c.cmd("LIST 1") == b"+OK 1 %d\r\n" % len(data)
    assert c.cmd("RETR 1") == b"+OK %d octets\r\n" % len(data)
    body = c.body()
    assert_same(body, retr_body(data), "RETR 1")
    assert body.count(b"\r\n..") == 4 and body.startswith(b"..\r\n")
    assert c.cmd("NOOP") == b"+OK\r\n"
    c.close()
