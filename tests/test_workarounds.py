"""Client workarounds ([pop3] client_workarounds, Dovecot's names), the
trailing blanks clients send, and RFC 1460's LAST ([pop3] last), end to end:
real fastpop servers on 127.0.0.1 and POP3 clients on raw sockets (the bytes
exactly) and poplib; the compiled session core and its pure-Python twin.

- ``outlook-no-nuls``: every NUL of RETR and TOP goes out as 0x80, on every
  path (one write for a small message, sendfile(2), the transform); a large
  message without a NUL still goes by sendfile (strace counts the calls);
- ``oe-ns-eoh``: TOP of a message without an empty line ends with one;
- ``AUTH `` and SASL responses with a trailing blank are accepted;
- ``LAST``: the highest message RETR sent, reset by RSET; off, an unknown command.
"""

from __future__ import annotations

import poplib
import shutil
import subprocess
import time

import pytest
from support.server import PARSERS, Raw, ServerProcess, message, serving
from support.tls import b64

PARSER = PARSERS[next(iter(PARSERS))]
# The compiled session core on one path, its pure-Python twin on the other
# (FASTPOP_NO_EXTENSIONS: the twin on both).
PARSER_OF = {"sendfile": PARSER, "transform": PARSERS[list(PARSERS)[-1]]}
WORKAROUNDS = ["--client-workarounds", "outlook-no-nuls,oe-ns-eoh", "--pop3-last"]
LINE = b"an ordinary line of a message body, stored with CRLF line ends.....\r\n"
BIG = 1536 * 1024  # above sending.SENDFILE_MIN, and past the first 1 MiB a scan reads at once


def big_message(tail: bytes = b"") -> bytes:
    """A CRLF message of BIG octets, no line starting with "." (it goes out as stored)."""
    head = b"From: a@example.com\r\nSubject: big\r\n\r\n"
    fill = LINE * ((BIG - len(head)) // len(LINE))
    return head + fill + tail


SMALL_NUL = b"From: a@example.com\r\nSubject: nul\r\n\r\nbefore\x00after\r\n\x00\r\n\x00\x00end\r\n"
BIG_NUL = big_message(b"a NUL near the end: \x00 and at a line start:\r\n\x00\r\n")
BIG_CLEAN = big_message()
HEADERS_ONLY = b"From: a@example.com\r\nSubject: a header and no body\r\n"
HEADERS_NO_EOL = b"From: a@example.com\r\nSubject: not even a final newline"
BIG_HEADERS_ONLY = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"h" * 60) for i in range(3000))  # about 240 KiB
NORMAL = message("normal", "body line 1\r\nbody line 2\r\n")
MESSAGES = [SMALL_NUL, BIG_NUL, BIG_CLEAN, HEADERS_ONLY, HEADERS_NO_EOL, BIG_HEADERS_ONLY, NORMAL]


def outlook(data: bytes) -> bytes:
    return data.replace(b"\x00", b"\x80")


def mode_args(mode: str) -> list[str]:
    return [] if mode == "sendfile" else ["--no-sendfile"]


@pytest.fixture(scope="module", params=["sendfile", "transform"])
def on(request, tmp_path_factory):
    """A server with both workarounds and LAST on."""
    yield from serving(ServerProcess(tmp_path_factory.mktemp("on"), PARSER_OF[request.param],
                                     extra_args=WORKAROUNDS + mode_args(request.param)))


@pytest.fixture(scope="module", params=["sendfile", "transform"])
def off(request, tmp_path_factory):
    """A server as configured by default: no workaround, no LAST."""
    yield from serving(ServerProcess(tmp_path_factory.mktemp("off"), PARSER_OF[request.param],
                                     extra_args=mode_args(request.param)))


def login(srv: ServerProcess, user) -> Raw:
    c = Raw(srv.port)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    return c


def list_sizes(c: Raw) -> list[int]:
    _, listing = c.multi("LIST")
    return [int(line.split()[1]) for line in listing.splitlines()]


# ----------------------------------------------------------------- outlook-no-nuls


def test_nuls_go_out_as_0x80_with_outlook_no_nuls(on):
    user = on.add_user(MESSAGES)
    c = login(on, user)
    sizes = list_sizes(c)
    for n, data in enumerate(MESSAGES[:3], 1):
        status, body = c.multi(f"RETR {n}")
        assert body == outlook(data), n
        assert status == b"+OK %d octets\r\n" % sizes[n - 1]  # the same length: the size LIST gave holds
        assert b"\x00" not in body
    _, top = c.multi("TOP 1 2")
    assert top == b"From: a@example.com\r\nSubject: nul\r\n\r\nbefore\x80after\r\n\x80\r\n"
    _, top = c.multi("TOP 2 100000")  # a large TOP: the transform
    assert top == outlook(BIG_NUL)
    assert c.cmd("QUIT").startswith(b"+OK")


def test_nuls_go_out_as_stored_by_default(off):
    user = off.add_user(MESSAGES[:3])
    c = login(off, user)
    for n, data in enumerate(MESSAGES[:3], 1):
        _, body = c.multi(f"RETR {n}")
        assert body == data, n
    _, top = c.multi("TOP 1 2")
    assert b"before\x00after" in top
    assert c.cmd("QUIT").startswith(b"+OK")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_only_a_message_with_a_nul_leaves_sendfile(tmp_path):
    """With outlook-no-nuls, a large message without a NUL still goes out by
    sendfile(2); one with a NUL goes through the transform, which replaces it."""
    srv = ServerProcess(tmp_path, PARSER, extra_args=WORKAROUNDS)
    user = srv.add_user([BIG_CLEAN, BIG_NUL])
    trace = tmp_path / "strace.out"
    srv.start()
    assert srv.proc is not None
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=sendfile", "-o", str(trace), "-p",
                               str(srv.proc.pid)])
    try:
        time.sleep(1.0)  # let strace attach to every thread
        c = login(srv, user)
        _, clean = c.multi("RETR 1")
        time.sleep(0.2)
        after_clean = trace.read_text().count("sendfile(")
        _, with_nul = c.multi("RETR 2")
        assert c.cmd("QUIT").startswith(b"+OK")
        time.sleep(0.3)
        after_nul = trace.read_text().count("sendfile(")
    finally:
        tracer.terminate()
        tracer.wait(10)
        srv.stop()
    assert clean == BIG_CLEAN and with_nul == outlook(BIG_NUL)
    assert after_clean >= 1  # the NUL-free message: sendfile, as without the workaround
    assert after_nul == after_clean  # the one with a NUL: copied through the transform


@pytest.mark.parametrize("grown", [b"grown in place\r\n", b"grown in place, a NUL: \x00\r\n"])
def test_a_large_message_grown_since_indexed_is_counted_then_searched(tmp_path, grown):
    """RETR of a large message grown in place since it was indexed: its octets
    are counted in one thread, then, with outlook-no-nuls, a NUL is looked for
    in another, the command pull waiting throughout: a NOOP pipelined behind
    the RETR is answered after the whole message, and a NUL goes out as 0x80."""
    srv = ServerProcess(tmp_path, PARSER, extra_args=WORKAROUNDS)
    user = srv.add_user([BIG_CLEAN])
    srv.start()
    try:
        c = login(srv, user)
        assert c.cmd("QUIT").startswith(b"+OK")  # indexed at BIG_CLEAN's size
        [path] = (user.maildir / "cur").iterdir()
        with open(path, "ab") as f:  # (cur/'s mtime unchanged: the index still counts as current)
            f.write(grown)
        c = login(srv, user)
        c.send(b"RETR 1\r\nNOOP\r\n")
        assert c.line() == b"+OK %d octets\r\n" % (len(BIG_CLEAN) + len(grown))
        assert c.body() == outlook(BIG_CLEAN + grown)
        assert c.line() == b"+OK\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


# ----------------------------------------------------------------- oe-ns-eoh


def test_top_ends_a_header_only_message_with_an_empty_line_with_oe_ns_eoh(on):
    user = on.add_user(MESSAGES)
    c = login(on, user)
    assert c.multi("TOP 4 0")[1] == HEADERS_ONLY + b"\r\n"
    assert c.multi("TOP 4 5")[1] == HEADERS_ONLY + b"\r\n"
    assert c.multi("TOP 5 0")[1] == HEADERS_NO_EOL + b"\r\n\r\n"  # the final CRLF, then the empty line
    assert c.multi("TOP 6 0")[1] == BIG_HEADERS_ONLY + b"\r\n"  # a large one: the transform
    # a message that has its empty line is left alone
    assert c.multi("TOP 7 0")[1] == NORMAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert c.multi("TOP 7 1")[1] == NORMAL.split(b"\r\n\r\n")[0] + b"\r\n\r\nbody line 1\r\n"
    # RETR is not changed (its size is LIST's)
    assert c.multi("RETR 4")[1] == HEADERS_ONLY
    assert c.multi("RETR 6")[1] == BIG_HEADERS_ONLY
    assert c.cmd("QUIT").startswith(b"+OK")


def test_top_of_a_header_only_message_by_default(off):
    user = off.add_user([HEADERS_ONLY, BIG_HEADERS_ONLY])
    c = login(off, user)
    assert c.multi("TOP 1 0")[1] == HEADERS_ONLY
    assert c.multi("TOP 2 0")[1] == BIG_HEADERS_ONLY
    assert c.cmd("QUIT").startswith(b"+OK")


def test_poplib_reads_the_header_of_a_header_only_message(on):
    """What the workaround is for: a client that splits TOP's reply at the
    empty line finds the header's end."""
    user = on.add_user([HEADERS_ONLY])
    p = poplib.POP3("127.0.0.1", on.port, timeout=10)
    p.user(user.name)
    p.pass_(user.password)
    lines = p.top(1, 0)[1]
    assert lines[-1] == b"" and lines[:-1] == HEADERS_ONLY.rstrip(b"\r\n").split(b"\r\n")
    p.quit()


# ----------------------------------------------------------------- trailing blanks


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    """A default server with each parser (the blanks are the parser's and the SASL decoder's)."""
    yield from serving(ServerProcess(tmp_path_factory.mktemp("blanks"), PARSERS[request.param]))


def test_auth_with_a_trailing_blank_lists_the_mechanisms(server):
    c = Raw(server.port)
    bare = c.multi("AUTH")
    assert c.multi("AUTH ") == bare  # Outlook's form
    assert c.multi("AUTH   ") == bare
    assert b"PLAIN" in bare[1]
    user = server.add_user()
    assert c.cmd(f"USER {user.name} ") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("STAT ").startswith(b"+OK 0 ")
    assert c.cmd("QUIT ").startswith(b"+OK")


def test_sasl_responses_with_blanks_around_them(server):
    user = server.add_user()
    c = Raw(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    assert c.cmd("*  ") == b"-ERR [AUTH] Authentication cancelled.\r\n"  # "*" with a blank still cancels
    assert c.cmd("AUTH LOGIN").startswith(b"+ ")
    assert c.cmd(b64(user.name) + " ").startswith(b"+ ")
    assert c.cmd(" " + b64(user.password) + " \t") == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")
    c = Raw(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    assert c.cmd(b64(f"\0{user.name}\0{user.password}") + " ") == b"+OK Logged in.\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")
    # a blank inside base64 is still not base64
    c = Raw(server.port)
    assert c.cmd("AUTH PLAIN") == b"+ \r\n"
    token = b64(f"\0{user.name}\0{user.password}")
    assert c.cmd(token[:4] + " " + token[4:]).startswith(b"-ERR [AUTH]")
    c.close()


# ----------------------------------------------------------------- LAST


def test_last_counts_the_highest_message_retrieved(on):
    user = on.add_user([message(f"m{i}") for i in range(4)])
    c = Raw(on.port)
    assert c.cmd("LAST") == b"-ERR Command not valid in this state.\r\n"
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    assert c.cmd("LAST") == b"+OK 0\r\n"
    c.multi("RETR 3")
    assert c.cmd("LAST") == b"+OK 3\r\n"
    c.multi("RETR 1")
    assert c.cmd("last") == b"+OK 3\r\n"  # the highest, not the latest
    c.multi("TOP 4 0")
    assert c.cmd("LAST") == b"+OK 3\r\n"  # TOP does not count
    assert c.cmd("DELE 3") == b"+OK Marked to be deleted.\r\n"
    assert c.cmd("LAST") == b"+OK 3\r\n"
    assert c.cmd("LAST 1") == b"-ERR Wrong number of arguments.\r\n"
    assert c.cmd("RSET").startswith(b"+OK")
    assert c.cmd("LAST") == b"+OK 0\r\n"
    c.multi("RETR 2")
    assert c.cmd("LAST ") == b"+OK 2\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")
    assert len(user.files()) == 4  # RSET undid the DELE


def test_last_is_unknown_by_default(off):
    user = off.add_user([message()])
    c = Raw(off.port)
    assert c.cmd("LAST") == b"-ERR Unknown command.\r\n"
    c = login(off, user)
    c.multi("RETR 1")
    assert c.cmd("LAST") == b"-ERR Unknown command.\r\n"
    assert c.cmd("QUIT").startswith(b"+OK")
