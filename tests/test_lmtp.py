"""The LMTP listener of ``fastpop serve --lmtp-listen``: smtplib.LMTP, swaks and
raw sockets against a real server on TCP and on a Unix socket, then the
delivered mail fetched back over POP3."""

from __future__ import annotations

import poplib
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.server import ServerProcess, message, serving

from fastpop.wire.stuffing import pop3_size


class LMTPServer(ServerProcess):
    def __init__(self, root: Path) -> None:
        self.socket_path = root / "lmtp.sock"
        super().__init__(root, "cython",
                         extra_args=["--lmtp-listen", "127.0.0.1:0", "--lmtp-listen", f"unix:{self.socket_path}"])
        self.lmtp_port = 0

    def start(self, port: int = 0) -> None:
        super().start(port)
        m = re.search(r"LMTP listening on 127\.0\.0\.1:(\d+), unix:(\S+)", self.log()[self._log_offset :])
        assert m, self.log()
        assert m.group(2) == str(self.socket_path)
        self.lmtp_port = int(m.group(1))

    def lmtp(self, unix: bool = False) -> smtplib.LMTP:
        if unix:
            return smtplib.LMTP(str(self.socket_path), timeout=30)
        return smtplib.LMTP("127.0.0.1", self.lmtp_port, timeout=30)

    def raw(self) -> RawLMTP:
        return RawLMTP(socket.create_connection(("127.0.0.1", self.lmtp_port), timeout=30))


class RawLMTP:
    """Exact bytes on the wire, replies read one by one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        assert self.reply().startswith("220 ")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One reply, multi-line replies joined with '|'."""
        lines = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), line
            lines.append(line[:-2].decode())
            if line[3:4] != b"-":
                return "|".join(lines)

    def start(self, *rcpts: str) -> list[str]:
        """LHLO, MAIL, RCPT... and DATA pipelined in one write; their replies."""
        cmds = b"LHLO test\r\nMAIL FROM:<sender@example.com>\r\n"
        cmds += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n"
        self.send(cmds)
        return [self.reply() for _ in range(3 + len(rcpts))]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def lmtp_server(tmp_path_factory):
    srv = LMTPServer(tmp_path_factory.mktemp("lmtp"))
    yield from serving(srv)
    assert not srv.socket_path.exists(), "the Unix socket outlived the server"


def fetch_all(user) -> list[bytes]:
    """Every message of ``user`` over POP3, checked byte for byte against its file."""
    files = sorted(user.maildir.glob("*/*"), key=lambda f: (int(f.name.split(".")[0]), f.name))
    p = user.login()
    try:
        count, total = p.stat()
        assert count == len(files)
        sizes = [int(line.split()[1]) for line in p.list()[1]]
        out = []
        for i in range(count):
            resp, lines, _ = p.retr(i + 1)
            data = b"\r\n".join(lines) + b"\r\n" if lines else b""
            assert resp == b"+OK %d octets" % sizes[i]
            out.append(data)
    finally:
        p.quit()
    stored = [f.read_bytes() for f in sorted(user.maildir.glob("cur/*"),
                                             key=lambda f: (int(f.name.split(".")[0]), f.name))]
    assert out == stored
    for f in user.maildir.glob("cur/*"):
        w = int(re.search(r",W=(\d+)", f.name).group(1))
        assert w == pop3_size(str(f)) == f.stat().st_size
    assert sizes == [len(d) for d in out] and total == sum(sizes)
    return out


# -- smtplib.LMTP


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_one_message_then_pop3(lmtp_server, unix):
    user = lmtp_server.add_user()
    body = message("over lmtp", "line one\r\n.leading dot\r\n..two\r\n.\r\nlast\r\n")
    with lmtp_server.lmtp(unix) as c:
        assert c.ehlo()[0] == 250  # smtplib's LMTP sends LHLO
        assert c.has_extn("pipelining") and c.has_extn("enhancedstatuscodes") and c.has_extn("8bitmime")
        assert c.sendmail("sender@example.com", [user.name], body) == {}
    assert fetch_all(user) == [body]


def test_multiple_recipients_one_unknown(lmtp_server):
    u1, u2 = lmtp_server.add_user(), lmtp_server.add_user()
    body = message("to three")
    with lmtp_server.lmtp() as c:
        c.ehlo()
        assert c.mail("sender@example.com")[0] == 250
        assert c.rcpt(u1.name) == (250, f"2.1.5 <{u1.name}> Ok".encode())
        code, text = c.rcpt("nobody-here")
        assert (code, text[:6]) == (550, b"5.1.1 ")
        assert c.rcpt(f"{u2.name}@example.com")[0] == 250
        # RFC 2033 4.2: one reply per accepted RCPT, in order (smtplib reads only the first)
        code, text = c.data(body)
        assert code == 250 and text.startswith(f"2.0.0 <{u1.name}> Ok".encode()), text
        code, text = c.getreply()
        assert code == 250 and text.startswith(f"2.0.0 <{u2.name}@example.com> Ok".encode()), text
        assert c.noop()[0] == 250  # still in step
    assert fetch_all(u1) == [body]
    assert fetch_all(u2) == [body]


def test_two_transactions_on_one_connection(lmtp_server):
    u1, u2 = lmtp_server.add_user(), lmtp_server.add_user()
    with lmtp_server.lmtp(unix=True) as c:
        assert c.sendmail("a@example.com", [u1.name], message("first")) == {}
        assert c.rset()[0] == 250
        assert c.sendmail("<>", [u2.name], message("second, a bounce")) == {}  # null sender
        assert c.sendmail("a@example.com", [u1.name], message("third")) == {}
    assert fetch_all(u1) == [message("first"), message("third")]
    assert fetch_all(u2) == [message("second, a bounce")]


def test_same_recipient_twice_is_stored_once_and_answered_twice(lmtp_server):
    user = lmtp_server.add_user()
    r = lmtp_server.raw()
    try:
        replies = r.start(user.name, f"{user.name}@example.com")
        assert replies[-1].startswith("354 ")
        r.send(message("dup") + b".\r\n")
        assert r.reply().startswith(f"250 2.0.0 <{user.name}> Ok")
        assert r.reply().startswith(f"250 2.0.0 <{user.name}@example.com> Ok")
    finally:
        r.close()
    assert fetch_all(user) == [message("dup")]


def test_rcpt_checks_and_command_errors(lmtp_server):
    r = lmtp_server.raw()
    try:
        r.send(b"HELO x\r\n")
        assert r.reply().startswith("500 ")  # LMTP has LHLO only (RFC 2033 4.1)
        r.send(b"MAIL FROM:<a@example.com>\r\n")
        assert r.reply() == "503 Error: send LHLO first"
        r.send(b"LHLO x\r\n")
        assert r.reply().startswith("250-")
        r.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<nobody@example.com>\r\nRCPT TO:<../etc@example.com>\r\nDATA\r\n")
        assert r.reply() == "250 2.1.0 Ok"
        assert r.reply().startswith("550 5.1.1 <nobody@example.com>")
        assert r.reply().startswith("550 5.1.1 <../etc@example.com>")
        assert r.reply().startswith("503 ")  # no recipient: 503, never 354
        r.send(b"QUIT\r\n")
        assert r.reply().startswith("221 ")
    finally:
        r.close()


def test_user_database_unavailable_is_451(lmtp_server):
    user = lmtp_server.add_user()
    passwd = lmtp_server.passwd
    good = passwd.read_bytes()
    try:
        # a malformed line is skipped (fastpop.auth.passwd_file); a file that cannot be read is not
        passwd.unlink()
        passwd.mkdir()
        with lmtp_server.lmtp() as c:
            c.ehlo()
            c.mail("a@example.com")
            code, text = c.rcpt(user.name)
            assert (code, text[:6]) == (451, b"4.3.0 "), text
    finally:
        if passwd.is_dir():
            passwd.rmdir()
        passwd.write_bytes(good)
        time.sleep(0.01)
        passwd.touch()  # a new mtime, so the fixed file is read again
    with lmtp_server.lmtp() as c:
        assert c.sendmail("a@example.com", [user.name], message("after")) == {}
    assert fetch_all(user) == [message("after")]


# -- DATA on the wire


DATA_CASES = [
    ("empty message", [b".\r\n"], b""),
    ("one empty line", [b"\r\n.\r\n"], b"\r\n"),
    ("dot stuffing removed", [b"a\r\n..b\r\n...\r\n..\r\n.\r\n"], b"a\r\n.b\r\n..\r\n.\r\n"),
    ("first line stuffed", [b"..x\r\n.\r\n"], b".x\r\n"),
    ("unstuffed dot line kept as text", [b".x\r\n.\r\n"], b"x\r\n"),
    ("bare cr lines", [b"\r\r\n\rx\r\n.\r\n"], b"\r\r\n\rx\r\n"),
    ("bare lf is not a line end", [b"a\n.\nb\r\n.\r\n"], b"a\r\n.\r\nb\r\n"),
    ("terminator split over writes", [b"hello\r", b"\n", b".", b"\r", b"\n"], b"hello\r\n"),
    ("dot line split over writes", [b"x\r\n.", b".y\r\n", b".\r\n"], b"x\r\n.y\r\n"),
    ("long line", [b"A" * 200_000 + b"\r\n..z\r\n.\r\n"], b"A" * 200_000 + b"\r\n.z\r\n"),
    ("long line starting with a dot", [b"..", b"B" * 150_000 + b"\r\n.\r\n"], b"." + b"B" * 150_000 + b"\r\n"),
    ("8-bit and NUL", [b"\xff\x00\xfe\r\n.\r\n"], b"\xff\x00\xfe\r\n"),
]


@pytest.mark.parametrize("pieces, stored", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_transparency(lmtp_server, pieces, stored, monkeypatch):
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)  # the client's limit, for the long lines
    user = lmtp_server.add_user()
    r = lmtp_server.raw()
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        assert r.start(user.name)[-1].startswith("354 ")
        for piece in pieces:
            r.send(piece)
            time.sleep(0.01)
        assert r.reply().startswith(f"250 2.0.0 <{user.name}> Ok")
        r.send(b"NOOP\r\n")
        assert r.reply().startswith("250 ")  # nothing after the "." was taken as data
    finally:
        r.close()
    [f] = (user.maildir / "new").iterdir()
    assert f.read_bytes() == stored
    assert fetch_all(user) == [stored]


def test_too_big_is_552_for_every_recipient(lmtp_server):
    from fastpop.delivery.lmtp import MAX_MESSAGE_SIZE

    u1, u2 = lmtp_server.add_user(), lmtp_server.add_user()
    r = lmtp_server.raw()
    try:
        assert r.start(u1.name, u2.name)[-1].startswith("354 ")
        line = b"x" * 998 + b"\r\n"
        chunk = line * 1024
        for _ in range(MAX_MESSAGE_SIZE // len(chunk) + 2):
            r.send(chunk)
        r.send(b".\r\n")
        assert r.reply() == f"552 5.3.4 <{u1.name}> Message too big for system"
        assert r.reply() == f"552 5.3.4 <{u2.name}> Message too big for system"
        r.send(b"MAIL FROM:<a@example.com> SIZE=%d\r\n" % (MAX_MESSAGE_SIZE + 1))
        assert r.reply().startswith("552 ")
        r.send(b"RSET\r\n")
        assert r.reply().startswith("250 ")
    finally:
        r.close()
    assert list(u1.maildir.glob("*/*")) == [] and list(u2.maildir.glob("*/*")) == []


def test_concurrent_connections(lmtp_server):
    users = [lmtp_server.add_user() for _ in range(4)]
    errors = []

    def send(user, unix):
        try:
            with lmtp_server.lmtp(unix) as c:
                for i in range(10):
                    assert c.sendmail("a@example.com", [user.name], message(f"n{i}")) == {}
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(u, i % 2 == 1)) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for user in users:
        assert fetch_all(user) == [message(f"n{i}") for i in range(10)]


# -- disk full: a tmpfs as one user's Maildir


def test_disk_full_is_452_for_that_recipient_only(lmtp_server):
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    full, fine = lmtp_server.add_user(), lmtp_server.add_user()
    shutil.rmtree(full.maildir)
    full.maildir.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(full.maildir)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        body = message("big", ("y" * 78 + "\r\n") * 5000)  # 400 kB, more than the tmpfs holds
        with lmtp_server.lmtp() as c:
            c.ehlo()
            c.mail("a@example.com")
            assert c.rcpt(full.name)[0] == 250
            assert c.rcpt(fine.name)[0] == 250
            code, text = c.data(body)
            assert (code, text[:6]) == (452, b"4.3.1 "), text  # RFC 3463: the disk, not the mailbox
            code, text = c.getreply()
            assert code == 250, text
        for sub in ("new", "tmp"):
            assert list((full.maildir / sub).iterdir()) == [], f"partial file left in {sub}/"
        assert fetch_all(fine) == [body]
        with lmtp_server.lmtp() as c:  # once there is room, the retry goes in
            assert c.sendmail("a@example.com", [full.name], message("small")) == {}
        assert fetch_all(full) == [message("small")]
    finally:
        subprocess.run(["umount", "-l", str(full.maildir)], check=False)


# -- swaks, the Debian package


swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (scripts/test installs it)")


@swaks
@pytest.mark.external
@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_swaks(lmtp_server, unix):
    u1, u2 = lmtp_server.add_user(), lmtp_server.add_user()
    where = ["--socket", str(lmtp_server.socket_path)] if unix else ["--server", f"127.0.0.1:{lmtp_server.lmtp_port}"]
    r = subprocess.run(
        ["swaks", "--protocol", "LMTP", *where, "--helo", "swaks.test", "--from", "sender@example.com",
         "--to", f"{u1.name},nobody-at-all,{u2.name}@example.com",
         "--header", "Subject: from swaks", "--body", "..starts with two dots\n.\nend\n"],
        capture_output=True,
        timeout=60,
    )
    out = r.stdout.decode()
    assert " -> LHLO swaks.test" in out, out
    assert "<** 550 5.1.1 <nobody-at-all>" in out, out
    assert f"<-  250 2.0.0 <{u1.name}> Ok" in out, out
    assert f"<-  250 2.0.0 <{u2.name}@example.com> Ok" in out, out
    assert "<-  221 " in out, out
    [m1] = fetch_all(u1)
    [m2] = fetch_all(u2)
    assert m1 == m2
    assert b"Subject: from swaks\r\n" in m1
    assert b"\r\n\r\n..starts with two dots\r\n.\r\nend\r\n" in m1, m1  # (swaks adds blank lines)


# -- the Unix socket's life


def test_stale_socket_is_replaced_and_shutdown_removes_it(tmp_path):
    srv = LMTPServer(tmp_path)
    user = srv.add_user()
    srv.start()
    try:
        srv.kill()  # SIGKILL leaves the socket file behind
        assert srv.socket_path.exists()
        srv.start()
        with srv.lmtp(unix=True) as c:
            assert c.sendmail("a@example.com", [user.name], message("after restart")) == {}
        assert fetch_all(user) == [message("after restart")]
    finally:
        assert srv.stop() == 0
    assert not srv.socket_path.exists()
    assert "Traceback" not in srv.log()


def test_live_socket_is_not_taken_over(tmp_path):
    first = LMTPServer(tmp_path / "a")
    first.start()
    try:
        second = ServerProcess(tmp_path / "b", "cython", extra_args=["--lmtp-listen", f"unix:{first.socket_path}"])
        with pytest.raises(RuntimeError, match="another server is listening there"):
            second.start()
        second.stop()
        with first.lmtp(unix=True) as c:
            assert c.noop()[0] == 250
    finally:
        assert first.stop() == 0
