"""Whole sessions and whole processes: timeouts, vanishing clients, signals,
the asyncio loop, two servers on one mail root, the demo, and the CLI.

Each test owns its server (``fresh_server``, not started until the test
says so), so it may set flags, kill it or restart it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import poplib
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from support import server as support_server
from support.server import ServerProcess, User, mailbox_held, message

from fastpop import __version__

CRLF = b"\r\n"
TIMEOUT_REPLY = b"-ERR Disconnected for inactivity.\r\n"
SHUTDOWN_REPLY = b"-ERR [SYS/TEMP] Server shutting down.\r\n"
PARSER_NAMES = ["cython", "python"]


# --------------------------------------------------------------------------- helpers


class Raw(support_server.Raw):
    def __init__(self, port: int, timeout: float = 10):
        super().__init__(port, timeout)
        assert self.greeting == b"+OK fastpop ready.\r\n"  # no APOP timestamp: APOP is off by default


def raw_login(server, user) -> Raw:
    c = Raw(server.port)
    assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
    assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
    return c


def wait_for_eof(c: Raw, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed; fails after ``limit`` s."""
    c.sock.settimeout(limit)
    start = time.monotonic()
    try:
        data = c.read_to_eof()
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {limit} s (got {bytes(c.buf)!r})")
    return data, time.monotonic() - start


def parser_env(parser: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)
    if parser == "python":
        env["FASTPOP_NO_EXTENSIONS"] = "1"
    return env


def fastpop(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 30):
    return subprocess.run(
        [sys.executable, "-m", "fastpop", *args],
        input=input, capture_output=True, text=True, env=env, timeout=timeout,
    )


# --------------------------------------------------------------------------- idle timeouts


def test_authorization_timeout(fresh_server):
    fresh_server.extra_args = ["--timeout-authorization", "1"]
    fresh_server.start()
    c = Raw(fresh_server.port)
    data, elapsed = wait_for_eof(c, 5)
    assert data == TIMEOUT_REPLY
    assert 0.8 <= elapsed <= 4, elapsed
    # activity keeps the session alive: idleness is counted from the last command
    c = Raw(fresh_server.port)
    start = time.monotonic()
    for _ in range(2):
        time.sleep(0.6)
        assert c.cmd("CAPA").startswith(b"+OK")
        c.body()
    data, _ = wait_for_eof(c, 5)
    assert data == TIMEOUT_REPLY
    assert time.monotonic() - start >= 2.0


def test_transaction_timeout(fresh_server):
    """--timeout-transaction alone: an idle logged-in session is closed after it,
    and its DELEs are not applied."""
    fresh_server.extra_args = ["--timeout-transaction", "1"]
    fresh_server.start()
    msgs = [message("a"), message("b")]
    user = fresh_server.add_user(messages=msgs)
    c = raw_login(fresh_server, user)
    assert c.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    data, elapsed = wait_for_eof(c, 5)
    assert data == TIMEOUT_REPLY
    assert 0.8 <= elapsed <= 4, elapsed
    assert user.contents() == sorted(msgs)
    p = user.login_when_free(fresh_server)
    assert p.stat()[0] == 2
    p.quit()


def test_transaction_timeout_differs_from_authorization_timeout(fresh_server):
    fresh_server.extra_args = ["--timeout-authorization", "1", "--timeout-transaction", "2.5"]
    fresh_server.start()
    msgs = [message("a"), message("b"), message("c")]
    user = fresh_server.add_user(messages=msgs)
    c = raw_login(fresh_server, user)
    assert c.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    assert c.cmd("DELE 3") == b"+OK Marked to be deleted.\r\n"
    # well past the authorization timeout, a logged-in session is still open
    time.sleep(1.6)
    assert c.cmd("STAT") == b"+OK 1 %d\r\n" % len(msgs[1])
    data, elapsed = wait_for_eof(c, 6)
    assert data == TIMEOUT_REPLY
    assert 2.2 <= elapsed <= 5, elapsed
    assert user.contents() == sorted(msgs)
    p = user.login_when_free(fresh_server)
    assert p.stat()[0] == 3
    p.quit()


# --------------------------------------------------------------------------- vanishing clients


def big_message(kind: str, size: int = 8 * 1024 * 1024) -> bytes:
    """A large message stored CRLF-clean (sent as stored but for stuffing dots) or
    with bare LF line ends (sent through the transform)."""
    data = message("huge", body="Body\r\n.dot\r\n", size=size - 2) + CRLF
    return data if kind == "crlf" else data.replace(CRLF, b"\n")


def connect_small_window(port: int) -> Raw:
    """A client with a small receive buffer, so that a reader who stops reading
    stalls the server long before the whole message is out."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    c = Raw.__new__(Raw)
    c.sock, c.buf = sock, bytearray()
    c.greeting = c.line()
    return c


def test_client_vanishes_mid_retr(fresh_server):
    """Connect, RETR a large message, read a little, go away (FIN, then RST):
    the mailbox is intact and unlocked, and the server goes on serving.
    Both a CRLF-clean message and one that needs the LF->CRLF transform."""
    fresh_server.start()
    other = fresh_server.add_user(messages=[message("other")])
    for kind in ("crlf", "lf"):
        data = big_message(kind)
        sent_form = data.replace(CRLF, b"\n").replace(b"\n", CRLF)  # what RETR carries, unstuffed
        user = fresh_server.add_user(messages=[data, message("small")])
        for how in ("close", "reset"):
            c = connect_small_window(fresh_server.port)
            assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
            assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
            assert c.cmd("DELE 2") == b"+OK Marked to be deleted.\r\n"
            c.sock.sendall(b"RETR 1\r\n")
            got = 0
            while got < 100_000:
                chunk = c.sock.recv(65536)
                assert chunk, f"connection closed after {got:d} octets of RETR"
                got += len(chunk)
            # the server is stalled on this reader; others are still served meanwhile
            p = other.login()
            assert p.retr(1)[1][2] == b"Subject: other"
            p.quit()
            if how == "reset":
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            p = user.login_when_free(fresh_server)
            assert p.stat() == (2, len(sent_form) + len(message("small"))), (kind, how)
            resp, lines, _ = p.retr(1)
            assert resp == b"+OK %d octets" % len(sent_form)
            assert hashlib.sha256(b"\r\n".join(lines) + CRLF).digest() == hashlib.sha256(sent_form).digest()
            p.quit()
            assert user.contents() == sorted([data, message("small")]), (kind, how)
    assert fresh_server.proc.poll() is None


def test_stalled_reader_times_out(fresh_server):
    """Readers that stop reading mid-RETR are dropped at the idle timeout; nothing
    they marked is deleted and their mailboxes are free again."""
    fresh_server.extra_args = ["--timeout-authorization", "1", "--timeout-transaction", "1"]
    fresh_server.start()
    readers = []
    for kind in ("crlf", "lf"):
        data = big_message(kind)
        user = fresh_server.add_user(messages=[data, message("small")])
        c = connect_small_window(fresh_server.port)
        assert c.cmd(f"USER {user.name}") == b"+OK\r\n"
        assert c.cmd(f"PASS {user.password}") == b"+OK Logged in.\r\n"
        assert c.cmd("DELE 2") == b"+OK Marked to be deleted.\r\n"
        c.sock.sendall(b"RETR 1\r\n")
        assert c.sock.recv(65536).startswith(b"+OK")
        readers.append((kind, data, user, c))
    time.sleep(2.5)  # not reading, well past the 1 s idle timeout
    for kind, data, user, c in readers:
        # the session is gone: the mailbox is free, nothing was deleted
        p = user.login_when_free(fresh_server, timeout=3)
        assert p.stat()[0] == 2, kind
        p.quit()
        assert user.contents() == sorted([data, message("small")]), kind
        # what the stalled reader can still read ends without the terminator
        got = b""
        c.sock.settimeout(5)
        try:
            while chunk := c.sock.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"the stalled connection ({kind}) is still open")
        assert len(got) < len(data) and not got.endswith(b"\r\n.\r\n"), kind
        c.close()


# --------------------------------------------------------------------------- signals


def test_sigkill_leaves_mailbox_intact_and_unlocked(fresh_server):
    fresh_server.start()
    msgs = [message("a"), message("b"), message("c")]
    user = fresh_server.add_user(messages=msgs)
    c = raw_login(fresh_server, user)
    for n in (1, 2, 3):
        assert c.cmd(f"DELE {n}") == b"+OK Marked to be deleted.\r\n"
    assert mailbox_held(user.maildir)
    fresh_server.kill()
    with pytest.raises((EOFError, ConnectionError)):
        c.line()
    c.close()
    assert user.contents() == sorted(msgs)
    assert len(list((user.maildir / "cur").iterdir())) == 3
    fresh_server.start()
    p = user.login()  # no [IN-USE]: the dead process's lock is gone
    assert p.stat() == (3, sum(map(len, msgs)))
    assert p.quit() == b"+OK Logging out."
    assert user.contents() == sorted(msgs)


def test_sigterm_closes_sessions_without_deletions(fresh_server):
    fresh_server.start()
    msgs = [message("a"), message("b")]
    user = fresh_server.add_user(messages=msgs)
    c = raw_login(fresh_server, user)
    assert c.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
    waiting = Raw(fresh_server.port)  # not logged in
    stalled = []  # readers that stopped reading mid-RETR, of a message sent as stored and of a transformed one
    for kind in ("crlf", "lf"):
        big_data = big_message(kind)
        reader = fresh_server.add_user(messages=[big_data, message("small")])
        r = connect_small_window(fresh_server.port)
        assert r.cmd(f"USER {reader.name}") == b"+OK\r\n"
        assert r.cmd(f"PASS {reader.password}") == b"+OK Logged in.\r\n"
        r.sock.sendall(b"DELE 2\r\nRETR 1\r\n")
        assert r.line() == b"+OK Marked to be deleted.\r\n"
        assert r.line() == b"+OK %d octets\r\n" % len(big_data.replace(CRLF, b"\n").replace(b"\n", CRLF))
        stalled.append((reader, big_data, r))
    time.sleep(0.2)
    port = fresh_server.port
    start = time.monotonic()
    rc = fresh_server.stop()
    assert rc == 0
    assert time.monotonic() - start < 5
    assert c.read_to_eof() == SHUTDOWN_REPLY
    assert waiting.read_to_eof() == SHUTDOWN_REPLY
    c.close()
    waiting.close()
    for reader, big_data, r in stalled:
        got = b""
        try:  # the stalled reader is dropped: no "." terminator is owed
            got = r.read_to_eof()
        except ConnectionError:
            pass
        assert not got.endswith(b"\r\n.\r\n")
        r.close()
        assert reader.contents() == sorted([big_data, message("small")])
    assert user.contents() == sorted(msgs)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "received SIGTERM: 3 sessions have up to 2 s to finish" in fresh_server.log()
    assert "closing 3 sessions that did not finish (nothing deleted)" in fresh_server.log()


# --------------------------------------------------------------------------- the asyncio loop


def test_asyncio_loop(fresh_server, tmp_path):
    srv = ServerProcess(tmp_path / "asyncio", fresh_server.parser, loop="asyncio")
    srv.start()
    try:
        big_data = message("big", size=3 * 1024 * 1024) + b"\r\n.\r\n"
        msgs = [message("a", ".dot\r\n"), big_data]
        user = srv.add_user(messages=msgs)
        c = Raw(srv.port)
        c.sock.sendall(f"USER {user.name}\r\nPASS {user.password}\r\nSTAT\r\nRETR 2\r\nRETR 1\r\nNOOP\r\n".encode())
        assert c.line() == b"+OK\r\n"
        assert c.line() == b"+OK Logged in.\r\n"
        assert c.line() == b"+OK 2 %d\r\n" % sum(map(len, msgs))
        assert c.line() == b"+OK %d octets\r\n" % len(big_data)
        assert c.body() == big_data.replace(b"\r\n.", b"\r\n..")
        assert c.line() == b"+OK %d octets\r\n" % len(msgs[0])
        assert c.body() == msgs[0].replace(b"\r\n.", b"\r\n..")
        assert c.line() == b"+OK\r\n"
        second = srv.connect()
        second.user(user.name)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_(user.password)
        second.close()
        assert c.cmd("DELE 1") == b"+OK Marked to be deleted.\r\n"
        assert c.cmd("QUIT") == b"+OK Logging out, messages deleted.\r\n"
        c.close()
        assert user.contents() == [big_data]
        # a reader that vanishes mid-RETR does not wedge the mailbox
        c = raw_login(srv, user)
        c.sock.sendall(b"RETR 1\r\n")
        c.sock.recv(10000)
        c.close()
        p = user.login_when_free(srv)
        assert p.stat() == (1, len(big_data))
        p.quit()
    finally:
        rc = srv.stop()
    assert rc == 0
    assert "Traceback" not in srv.log(), srv.log()
    assert "loop: asyncio" in srv.log()


# --------------------------------------------------------------------------- two processes, one mail root


def test_two_servers_share_one_mail_root(fresh_server, tmp_path):
    fresh_server.start()
    other = ServerProcess(tmp_path / "second", fresh_server.parser)
    other.passwd, other.mail = fresh_server.passwd, fresh_server.mail
    other.start()
    try:
        msgs = [message("a"), message("b")]
        user = fresh_server.add_user(messages=msgs)
        twin = User(other, user.name, user.password, user.maildir)
        p = user.login()
        q = other.connect()
        q.user(user.name)
        with pytest.raises(poplib.error_proto) as exc:
            q.pass_(user.password)
        assert exc.value.args[0] == b"-ERR [IN-USE] Mailbox is locked by another POP3 session."
        q.close()
        assert p.dele(1) == b"+OK Marked to be deleted."
        p.quit()
        q = twin.login_when_free(other)
        assert q.stat() == (1, len(msgs[1]))
        # and the other way round
        p = fresh_server.connect()
        p.user(user.name)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            p.pass_(user.password)
        p.close()
        q.quit()
        user.login_when_free(fresh_server).quit()
    finally:
        rc = other.stop()
    assert rc == 0
    assert "Traceback" not in other.log(), other.log()


# --------------------------------------------------------------------------- demo


def _port_busy(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE
    finally:
        s.close()
    return False


@pytest.mark.parametrize("parser", PARSER_NAMES)
def test_demo(tmp_path, parser):
    if _port_busy(1110):
        pytest.skip("127.0.0.1:1110 is in use")
    demo_dir = tmp_path / "demo"
    for run in range(2):  # the second run reuses the directory and adds nothing
        log_path = tmp_path / f"demo{run}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastpop", "serve", "--demo", "--demo-dir", str(demo_dir),
                 *(["--apop"] if run else [])],  # APOP is off unless asked for, in the demo too
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=parser_env(parser),
            )
        try:
            deadline = time.monotonic() + 20
            while "listening on 127.0.0.1:1110" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.02)
            text = log_path.read_text()
            assert "fastpop demo: user 'demo', password 'demo' on 127.0.0.1:1110" in text
            assert f"(parser: {parser}, loop: uvloop" in text
            p = poplib.POP3("127.0.0.1", 1110, timeout=10)
            p.user("demo")
            assert p.pass_("demo") == b"+OK Logged in."
            count, size = p.stat()
            assert count == 3
            subjects, total = [], 0
            for n in (1, 2, 3):
                resp, lines, _ = p.retr(n)
                total += int(resp.split()[1])
                subjects += [line for line in lines if line.startswith(b"Subject: ")]
            assert total == size
            assert subjects == [b"Subject: Welcome to fastpop", b"Subject: Dot-stuffing works",
                                b"Subject: Leave mail on the server"]
            assert b".This line starts with a dot, and so does the next one." in p.retr(2)[1]
            p.quit()
            p = poplib.POP3("127.0.0.1", 1110, timeout=10)
            if run:  # with --apop: the demo password is stored in clear, so APOP works too
                assert p.apop("demo", "demo") == b"+OK Logged in."
                assert p.stat()[0] == 3
            else:  # no timestamp in the greeting: APOP is not offered
                assert p.getwelcome() == b"+OK fastpop ready."
            p.quit()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(10)
        assert rc == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    assert (demo_dir / "passwd").read_text().startswith("demo:{PLAIN}demo:")
    assert len(os.listdir(demo_dir / "mail" / "demo" / "Maildir" / "cur")) == 3


# --------------------------------------------------------------------------- CLI


def test_user_management_cli(fresh_server):
    """user add/list/passwd/del on the running server's passwd-file, password on stdin;
    the server picks every change up without a restart."""
    fresh_server.start()
    env = parser_env(fresh_server.parser)
    pw = str(fresh_server.passwd)
    existing = fresh_server.add_user(messages=[message()])

    r = fastpop("user", "add", "--passwd-file", pw, "alice", input="first pass\n", env=env)
    assert r.returncode == 0, r.stderr
    fields = [line.split(":") for line in fresh_server.passwd.read_text().splitlines()]
    assert fields[0][:2] == [existing.name, "{PLAIN}" + existing.password]
    assert fields[1][0] == "alice" and re.fullmatch(r"\{ARGON2ID\}\$argon2id\$.+", fields[1][1]), fields[1]
    assert fresh_server.passwd.stat().st_mode & 0o777 == 0o600

    r = fastpop("user", "list", "--passwd-file", pw, env=env)
    assert r.returncode == 0 and r.stdout.split() == [existing.name, "alice"]

    alice = User(fresh_server, "alice", "first pass", fresh_server.mail / "alice")
    p = alice.login()  # argon2id verified; the Maildir is created at first login
    assert p.stat() == (0, 0)
    p.quit()
    alice.deliver(message("for alice"))
    p = alice.login_when_free(fresh_server)
    assert p.stat()[0] == 1
    p.quit()
    existing.login_when_free(fresh_server).quit()  # other users untouched

    r = fastpop("user", "passwd", "--passwd-file", pw, "alice", input="second pass\n", env=env)
    assert r.returncode == 0, r.stderr
    p = fresh_server.connect()
    p.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
        p.pass_("first pass")
    p.close()
    alice.password = "second pass"
    alice.login_when_free(fresh_server).quit()

    r = fastpop("user", "del", "--passwd-file", pw, "alice", env=env)
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in fresh_server.passwd.read_text().splitlines()] == [existing.name]
    p = fresh_server.connect()
    p.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
        p.pass_("second pass")
    p.close()
    assert alice.contents() == [message("for alice")]  # deleting a user keeps the mail


def run_cli(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """fastpop's command line in this process (fast), password on a non-tty stdin."""
    from fastpop import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_user_cli_schemes_and_refusals(tmp_path, monkeypatch, capsys):
    pw = str(tmp_path / "passwd")
    assert run_cli(monkeypatch, capsys, "user", "add", "--passwd-file", pw, "alice", stdin="a pass\n")[0] == 0
    assert run_cli(monkeypatch, capsys, "user", "add", "--passwd-file", pw, "--scheme", "plain", "bob",
                   stdin="bob pw\n")[0] == 0
    assert run_cli(monkeypatch, capsys, "user", "add", "--passwd-file", pw, "--scheme", "ssha512", "carol",
                   stdin="carol\r\n")[0] == 0
    lines = (tmp_path / "passwd").read_text().splitlines()
    stored = {line.split(":")[0]: line.split(":")[1] for line in lines}
    assert list(stored) == ["alice", "bob", "carol"]
    assert stored["bob"] == "{PLAIN}bob pw"
    assert stored["carol"].startswith("{SSHA512}")
    from fastpop.auth.passwords import verify

    assert verify(stored["alice"], "a pass") and not verify(stored["alice"], "a pas")
    assert verify(stored["carol"], "carol")  # the CRLF of the line is not part of it

    def refused(args, stdin, rc, text):
        got_rc, _, err = run_cli(monkeypatch, capsys, *args, stdin=stdin)
        assert got_rc == rc and text in err, (args, got_rc, err)

    refused(["user", "add", "--passwd-file", pw, "alice"], "x\n", 1, "user alice exists")
    refused(["user", "passwd", "--passwd-file", pw, "nobody"], "x\n", 1, "no user nobody")
    refused(["user", "del", "--passwd-file", pw, "nobody"], "", 1, "no user nobody")
    for bad in ("../evil", "a/b", ".hidden"):
        refused(["user", "add", "--passwd-file", pw, bad], "x\n", 2, "invalid user name")
    refused(["user", "add", "--passwd-file", pw, "dave"], "\n", 2, "empty password")
    refused(["user", "list"], "", 2, "give --passwd-file or --config")
    assert (tmp_path / "passwd").read_text().splitlines() == lines  # nothing changed by a refusal
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "list", "--passwd-file", pw)
    assert rc == 0 and out.split() == ["alice", "bob", "carol"]


@pytest.mark.parametrize("parser", PARSER_NAMES)
def test_version(parser):
    r = fastpop("--version", env=parser_env(parser))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"fastpop {__version__} (parser: {parser}, stuffing: {parser}, ")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__)
