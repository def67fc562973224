"""fastpop against real POP3 clients: curl, fetchmail and mpop.

Every client runs as a separate process with a hard time bound (``TIMEOUT``),
in a temporary HOME, talking only to the fastpop on 127.0.0.1 started by the
``server`` fixture, without TLS (test_tls.py has them over TLS).

What is compared
----------------
The server sends a stored message as its "wire form" (RFC 1939): bare LF
becomes CRLF, the message ends with a line end, and lines starting with "."
are dot-stuffed.  Every client here removes the stuffing again, so:

* curl writes the wire form unchanged (CRLF line ends) - compared byte for byte.
* fetchmail (with an MDA) and mpop (maildir delivery) both write LF line ends
  and prepend exactly one ``Received:`` header of their own.  We compare
  ``wire form with CRLF -> LF`` against ``client output with that single
  leading Received header (its first line and its folded continuation lines)
  removed``; the removed header is checked to be the client's own
  (``... with POP3 (fetchmail-X)`` / ``by HOST (mpop-X) with POP3``).
  Nothing else is normalised.

After each test the server log must contain no "Traceback", every session the
test opened must have ended (and ended with the client's QUIT).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.server import PARSERS, ServerProcess, message, serving

pytestmark = pytest.mark.external

TIMEOUT = 60  # seconds, for every external process

CURL = shutil.which("curl")
FETCHMAIL = shutil.which("fetchmail")
MPOP = shutil.which("mpop")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install -y curl)")
needs_fetchmail = pytest.mark.skipif(
    FETCHMAIL is None, reason="fetchmail is not installed (apt-get install -y fetchmail)"
)
needs_mpop = pytest.mark.skipif(MPOP is None, reason="mpop is not installed (apt-get install -y mpop)")

try:  # large messages are read and stuffed in pieces this size
    from fastpop.wire.stuffing import CHUNK as READ_CHUNK
except ImportError:
    READ_CHUNK = 256 * 1024


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    """conftest's ``server`` with APOP on (off by default), so the clients' APOP
    logins are tested too; test_mpop_auth_apop_not_offered_by_default has the default."""
    yield from serving(ServerProcess(tmp_path_factory.mktemp("fastpop"), PARSERS[request.param], extra_args=["--apop"]))


# ----------------------------------------------------------------- messages


def _fill(buf: bytearray, upto: int, eol: bytes = b"\r\n") -> None:
    """Append whole lines of x's so that len(buf) == upto exactly."""
    assert upto - len(buf) > 30
    while upto - len(buf) > 100:
        buf += b"x" * 70 + eol
    buf += b"y" * (upto - len(buf) - len(eol)) + eol
    assert len(buf) == upto


def dotty_big(eol: bytes = b"\r\n") -> bytes:
    """About 1 MB with dot-lines placed where the server cuts the file into
    read chunks: a "." line starting exactly on a chunk boundary, (CRLF only)
    a CRLF split across a boundary followed by a dot line, and a lone "."
    line whose dot is the last byte of a chunk."""
    crlf = eol == b"\r\n"
    header = "From: a@example.com\nTo: b@example.com\nSubject: dotty big {}\n\n".format("CRLF" if crlf else "LF")
    buf = bytearray(header.replace("\n", eol.decode()).encode())
    buf += b".first body line" + eol + b"..second" + eol + b"." + eol
    _fill(buf, READ_CHUNK, eol)
    buf += b".dot line at the first chunk boundary" + eol
    if crlf:
        _fill(buf, 2 * READ_CHUNK - 10, eol)
        buf += b"123456789\r\n"  # CR is the chunk's last byte, LF the next chunk's first
        assert buf[2 * READ_CHUNK - 1] == 13
    else:
        _fill(buf, 2 * READ_CHUNK, eol)
    buf += b".after a chunk boundary" + eol
    _fill(buf, 3 * READ_CHUNK - 1, eol)
    buf += b"." + eol  # lone dot, the last byte of the third chunk
    buf += b".." + eol
    _fill(buf, 1_000_000 - 10 - len(eol), eol)
    buf += b".last line" + eol
    assert len(buf) == 1_000_000
    return bytes(buf)


def dot_dense() -> bytes:
    """About 400 kB, CRLF, where every body line starts with one to three dots."""
    lines = [b"." * (1 + i % 3) + b"line %d" % i + (b" " + b"z" * (i % 50) if i % 7 else b"") for i in range(20000)]
    return b"From: a@example.com\r\nTo: b@example.com\r\nSubject: dot dense\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


def corpus() -> list[bytes]:
    """A mix of what a mailbox holds: plain, dot-lines, empty body, bare-LF
    storage (as many MDAs write Maildir files), and large messages, which the
    server does not send in one write: CRLF-stored ones take its sendfile path
    for RETR, LF-stored ones and every TOP its chunked transform."""
    return [
        message("plain"),
        message("dots", body=".\r\n..\r\n...\r\n.leading\r\n..two\r\nmid.dle\r\n. space\r\n.\r\nend\r\n"),
        message("empty body", body=""),
        b"From: a@example.com\nTo: b@example.com\nSubject: stored with LF\n\n.dot\nline\n\n.\n",
        message("big", size=1_000_000),
        dotty_big(),
        message("after big", body="Tail message.\r\n..\r\n"),
        dotty_big(b"\n"),
        dot_dense(),
    ]


def wire(data: bytes) -> bytes:
    """What a client gets for RETR after removing dot-stuffing: LF -> CRLF, final line end."""
    out = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def as_lf(data: bytes) -> bytes:
    return wire(data).replace(b"\r\n", b"\n")


def top(data: bytes, lines: int) -> bytes:
    """The un-stuffed reply to TOP msg lines: header, blank line, `lines` body lines."""
    w = wire(data)
    head, sep, body = w.partition(b"\r\n\r\n")
    kept = body.split(b"\r\n")[:-1][:lines]
    return head + sep + b"".join(line + b"\r\n" for line in kept)


def strip_received(data: bytes, marker: re.Pattern[bytes]) -> bytes:
    """Remove the one Received header a client prepended (LF text) and check it is the client's."""
    m = re.match(rb"Received: [^\n]*\n(?:[ \t][^\n]*\n)*", data)
    assert m, f"expected a leading Received header, got {data[:200]!r}"
    header = m.group(0)
    assert marker.search(header), f"leading Received header is not the client's own: {header!r}"
    return data[m.end():]


FETCHMAIL_RECEIVED = re.compile(rb"^Received: from 127\.0\.0\.1\n.*with POP3 \(fetchmail-[0-9.]+\)", re.S)
MPOP_RECEIVED = re.compile(rb"^Received: from 127\.0\.0\.1 .*\(mpop-[0-9.]+\) with POP3", re.S)


# ----------------------------------------------------------------- running clients


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run a client in its own process group; fail the test if it does not end in time."""
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{shlex.join(args)} did not finish within {timeout}s\n"
            f"--- stdout\n{out.decode(errors='replace')[-5000:]}\n--- stderr\n{err.decode(errors='replace')[-5000:]}"
        )
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def describe(res: subprocess.CompletedProcess) -> str:
    return (
        f"{shlex.join(res.args)} -> exit {res.returncode}\n"
        f"--- stdout\n{res.stdout.decode(errors='replace')[-8000:]}\n"
        f"--- stderr\n{res.stderr.decode(errors='replace')[-8000:]}"
    )


def client_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no proxies, no inherited mail settings, a private HOME."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LC_ALL": "C",
        "TMPDIR": str(home),
    }
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def server_log_clean(server):
    """After each test: every session it opened has ended with QUIT, and no Traceback."""
    start = len(server.log())
    yield
    deadline = time.monotonic() + 10
    while True:
        part = server.log()[start:]
        logins = len(re.findall(r" login user=", part))
        ended = re.findall(r" session user=\S+ .* end=(\S+)", part)
        if len(ended) >= logins or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    log = server.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000):][:20000]
    assert len(ended) >= logins, f"{logins - len(ended)} session(s) never ended:\n{part}"
    assert all(reason == "quit" for reason in ended), f"sessions not ended by QUIT:\n{part}"


def uidls(user) -> list[str]:
    p = user.login()
    try:
        return [line.split()[1].decode() for line in p.uidl()[1]]
    finally:
        p.quit()


# ----------------------------------------------------------------- curl
#
# curl (7.88) logs in with SASL when CAPA offers it (fastpop offers PLAIN,
# LOGIN and SCRAM-SHA-256; Debian's curl has no SCRAM, so it picks PLAIN),
# else with APOP when the greeting carries a timestamp, as fastpop's does with
# --apop (the ``server`` here; APOP is off by default).
# "--login-options AUTH=+APOP" makes it use APOP.


def curl(server, user, path: str = "", *extra: str, password: str | None = None) -> subprocess.CompletedProcess:
    url = f"pop3://{user.name}:{password or user.password}@127.0.0.1:{server.port}/{path}"
    # -q first: ignore any .curlrc; no proxy; HOME points nowhere.
    return run([CURL, "-q", "-sS", "--max-time", str(TIMEOUT), "--noproxy", "*", *extra, url],
               env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C"})


@needs_curl
def test_curl_list(server):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    res = curl(server, user)
    assert res.returncode == 0, describe(res)
    assert res.stdout == b"".join(b"%d %d\r\n" % (i, len(wire(m))) for i, m in enumerate(msgs, 1))


@needs_curl
def test_curl_retr_every_message(server):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    for i, data in enumerate(msgs, 1):
        res = curl(server, user, str(i))
        assert res.returncode == 0, describe(res)
        assert res.stdout == wire(data), f"message {i}: curl output differs from what was delivered"
        if b"\n" not in data.replace(b"\r\n", b""):
            assert res.stdout == data  # CRLF-stored messages come back byte for byte
    assert user.contents() == sorted(msgs)  # RETR deletes nothing


@needs_curl
def test_curl_apop_is_used_and_bad_password_fails(server):
    user = server.add_user(messages=[message("one")])
    res = curl(server, user, "1", "-v", "--login-options", "AUTH=+APOP")
    assert res.returncode == 0, describe(res)
    assert re.search(rb"^> APOP " + user.name.encode() + rb" [0-9a-f]{32}\r?$", res.stderr, re.M), describe(res)
    bad = curl(server, user, "1", "--login-options", "AUTH=+APOP", password="wrong")
    assert bad.returncode == 67, describe(bad)  # CURLE_LOGIN_DENIED
    assert bad.stdout == b""


@needs_curl
def test_curl_uses_sasl_plain_when_offered(server):
    user = server.add_user(messages=[message("one")])
    res = curl(server, user, "1", "-v")
    assert res.returncode == 0, describe(res)
    assert re.search(rb"^> AUTH PLAIN\r?$", res.stderr, re.M), describe(res)
    assert res.stdout == message("one")
    bad = curl(server, user, "1", password="wrong")
    assert bad.returncode == 67, describe(bad)  # CURLE_LOGIN_DENIED


@needs_curl
def test_curl_missing_message(server):
    user = server.add_user(messages=[message("one")])
    res = curl(server, user, "2")
    assert res.returncode != 0, describe(res)
    assert res.stdout == b""


@needs_curl
def test_curl_uidl(server):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    res = curl(server, user, "", "-X", "UIDL")
    assert res.returncode == 0, describe(res)
    expected = uidls(user)
    assert len(expected) == len(msgs)
    assert res.stdout == b"".join(b"%d %s\r\n" % (i, u.encode()) for i, u in enumerate(expected, 1))
    # Stable: Maildir unique names, so a second session gives the same list.
    again = curl(server, user, "", "-X", "UIDL")
    assert again.stdout == res.stdout


@needs_curl
@pytest.mark.parametrize("msg, lines", [(1, 0), (2, 0), (2, 3), (3, 5), (4, 2), (5, 0), (5, 4), (6, 3), (6, 100000),
                                       (8, 7), (8, 100000), (9, 0), (9, 1000)])
def test_curl_top(server, msg, lines):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    res = curl(server, user, "", "-X", f"TOP {msg} {lines}")
    assert res.returncode == 0, describe(res)
    assert res.stdout == top(msgs[msg - 1], lines)


# ----------------------------------------------------------------- fetchmail
#
# rcfile (mode 0600), passed with -f; HOME and FETCHMAILHOME point at an empty
# temporary directory so no ~/.fetchmailrc, ~/.fetchids or ~/.netrc of the
# machine is read, and the pid/lock file and idfile are given explicitly
# (as root fetchmail would otherwise use /var/run/fetchmail.pid):
#
#   set no showdots
#   poll 127.0.0.1 via 127.0.0.1 with proto POP3 port PORT auth password
#       timeout 30 no dns (uidl | no uidl)
#     user "NAME" there with password "PASS" is "LOCALUSER" here
#     sslproto '' no sslcertck       # 6.4: sslcertck is on by default and
#                                    # demands TLS; sslproto '' disables STLS
#     (keep | no keep)               # "--keep" on the command line overrides
#     mda "/bin/sh TMP/mda.sh TMP/out"
#
# Command line: fetchmail -f RC --nosyslog -v -N -d0 --pidfile TMP/fetchmail.pid
#   -i TMP/fetchids [--keep]
# (-N/--nodetach and -d0: foreground, one poll, never a daemon.)  Delivery is
# only through the MDA, so fetchmail makes no SMTP connection; the only
# network peer is 127.0.0.1:PORT.

MDA_SCRIPT = """\
#!/bin/sh
# Store the message on stdin as OUT/NNNNN.eml (numbered in arrival order).
out="$1"
n=$(ls "$out" | wc -l)
cat > "$out/.incoming" || exit 75
mv "$out/.incoming" "$out/$(printf '%05d' "$n").eml" || exit 75
"""


class Fetchmail:
    def __init__(self, server, user, tmp: Path, *, uidl: bool = False, keep_in_rc: bool = False):
        self.tmp = tmp
        self.home = tmp / "home"
        self.out = tmp / "out"
        self.out.mkdir(parents=True)
        mda = tmp / "mda.sh"
        mda.write_text(MDA_SCRIPT)
        mda.chmod(0o700)
        self.rc = tmp / "fetchmailrc"
        self.rc.write_text(
            "set no showdots\n"
            f"poll 127.0.0.1 via 127.0.0.1 with proto POP3 port {server.port} auth password timeout 30 no dns"
            f" {'uidl' if uidl else 'no uidl'}\n"
            f'  user "{user.name}" there with password "{user.password}" is "{getpass.getuser()}" here\n'
            f"  sslproto '' no sslcertck\n"
            f"  {'keep' if keep_in_rc else 'no keep'}\n"
            f'  mda "/bin/sh {mda} {self.out}"\n'
        )
        self.rc.chmod(0o600)
        self.idfile = tmp / "fetchids"

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        env = client_env(self.home, FETCHMAILHOME=str(self.home), FETCHMAILUSER=getpass.getuser())
        return run(
            [FETCHMAIL, "-f", str(self.rc), "--nosyslog", "-v", "-N", "-d0",
             "--pidfile", str(self.tmp / "fetchmail.pid"), "-i", str(self.idfile), *extra],
            env=env, cwd=self.tmp,
        )

    def delivered(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.out.glob("*.eml"))]

    def bodies(self) -> list[bytes]:
        return [strip_received(d, FETCHMAIL_RECEIVED) for d in self.delivered()]


FETCHMAIL_OK, FETCHMAIL_NOMAIL = 0, 1


def assert_no_tls_attempt(res: subprocess.CompletedProcess) -> None:
    text = res.stdout + res.stderr
    assert b"POP3> USER" in text and b"STLS" not in text and b"TLS" not in text, describe(res)


@needs_fetchmail
def test_fetchmail_fetch_and_delete(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    fm = Fetchmail(server, user, tmp_path)
    res = fm.run()
    assert res.returncode == FETCHMAIL_OK, describe(res)
    assert_no_tls_attempt(res)
    assert fm.bodies() == [as_lf(m) for m in msgs], describe(res)  # each exactly once, in order
    assert user.files() == [], "fetchmail without keep must leave the server's Maildir empty"
    assert b"POP3> DELE" in res.stdout + res.stderr
    again = fm.run()
    assert again.returncode == FETCHMAIL_NOMAIL, describe(again)
    assert len(fm.delivered()) == len(msgs)


@needs_fetchmail
def test_fetchmail_keep(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    fm = Fetchmail(server, user, tmp_path)
    res = fm.run("--keep")
    assert res.returncode == FETCHMAIL_OK, describe(res)
    assert_no_tls_attempt(res)
    assert fm.bodies() == [as_lf(m) for m in msgs], describe(res)
    assert b"POP3> DELE" not in res.stdout + res.stderr
    assert user.contents() == sorted(msgs), "--keep must leave every message on the server"


@needs_fetchmail
def test_fetchmail_uidl_keep(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    fm = Fetchmail(server, user, tmp_path, uidl=True, keep_in_rc=True)
    first = fm.run()
    assert first.returncode == FETCHMAIL_OK, describe(first)
    assert fm.bodies() == [as_lf(m) for m in msgs], describe(first)
    ids = fm.idfile.read_text()
    for uid in uidls(user):
        assert uid in ids, f"{uid} missing from fetchmail's idfile:\n{ids}"

    second = fm.run()
    assert second.returncode == FETCHMAIL_NOMAIL, describe(second)
    assert len(fm.delivered()) == len(msgs), "UIDL + keep: a second run must fetch nothing"

    extra = message("late arrival", body=".late\r\n")
    user.deliver(extra)
    third = fm.run()
    assert third.returncode == FETCHMAIL_OK, describe(third)
    assert fm.bodies() == [as_lf(m) for m in msgs] + [as_lf(extra)], describe(third)
    assert user.contents() == sorted(msgs + [extra])


@needs_fetchmail
@pytest.mark.parametrize("variant", ["auth any", "proto APOP"])
def test_fetchmail_other_logins(server, tmp_path, variant):
    """'auth any' makes fetchmail ask CAPA first (then USER/PASS: no STLS, no SASL
    offered); 'proto APOP' logs in with APOP from the greeting's timestamp."""
    msgs = corpus()
    user = server.add_user(messages=msgs)
    fm = Fetchmail(server, user, tmp_path)
    rc = fm.rc.read_text()
    if variant == "auth any":
        rc = rc.replace(" auth password ", " auth any ")
    else:
        rc = rc.replace(" proto POP3 ", " proto APOP ").replace(" auth password ", " ")
    fm.rc.write_text(rc)
    res = fm.run()
    assert res.returncode == FETCHMAIL_OK, describe(res)
    text = res.stdout + res.stderr
    assert b"STLS" not in text and b"TLS" not in text, describe(res)
    if variant == "auth any":
        assert b"POP3> CAPA" in text and b"POP3> USER" in text, describe(res)
    else:
        assert re.search(rb"POP3> APOP " + user.name.encode() + rb" [0-9a-f]{32}\n", text), describe(res)
    assert fm.bodies() == [as_lf(m) for m in msgs], describe(res)
    assert user.files() == []


@needs_fetchmail
def test_fetchmail_uidl_delete(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    fm = Fetchmail(server, user, tmp_path, uidl=True)
    res = fm.run()
    assert res.returncode == FETCHMAIL_OK, describe(res)
    assert fm.bodies() == [as_lf(m) for m in msgs], describe(res)
    assert user.files() == []


# ----------------------------------------------------------------- mpop
#
# Config file (mode 0600), passed with -C; HOME is an empty temporary directory:
#
#   defaults
#   account test
#   host 127.0.0.1
#   port PORT
#   timeout 30
#   tls off
#   auth user                 # USER/PASS; "auth on" refuses cleartext without TLS
#   user NAME
#   password PASS
#   delivery maildir TMP/maildir
#   keep on|off
#   uidls_file TMP/uidls
#
# Command line: mpop -C CONF --debug test.  mpop uses PIPELINING when the
# server advertises it (fastpop does): it sends RETR/DELE in batches before
# reading the replies.


class Mpop:
    def __init__(self, server, user, tmp: Path, *, keep: bool):
        self.tmp = tmp
        self.home = tmp / "home"
        self.maildir = tmp / "maildir"
        for sub in ("cur", "new", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        self.uidls_file = tmp / "uidls"
        self.conf = tmp / "mpoprc"
        self.conf.write_text(
            "defaults\n"
            "account test\n"
            "host 127.0.0.1\n"
            f"port {server.port}\n"
            "timeout 30\n"
            "tls off\n"
            "auth user\n"
            f"user {user.name}\n"
            f"password {user.password}\n"
            f"delivery maildir {self.maildir}\n"
            f"keep {'on' if keep else 'off'}\n"
            f"uidls_file {self.uidls_file}\n"
        )
        self.conf.chmod(0o600)

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        return run([MPOP, "-C", str(self.conf), "--debug", *extra, "test"], env=client_env(self.home), cwd=self.tmp)

    def delivered(self) -> list[bytes]:
        files = [p for sub in ("new", "cur") for p in (self.maildir / sub).iterdir()]
        return [p.read_bytes() for p in files]

    def bodies(self) -> list[bytes]:
        return sorted(strip_received(d, MPOP_RECEIVED) for d in self.delivered())


def pipelined(res: subprocess.CompletedProcess, command: bytes) -> bool:
    """True if mpop sent two `command`s in a row before reading a reply."""
    lines = res.stdout.splitlines()
    return any(a.startswith(b"--> " + command) and b.startswith(b"--> " + command) for a,
               b in zip(lines, lines[1:], strict=False))


@needs_mpop
def test_mpop_keep_on(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    mp = Mpop(server, user, tmp_path, keep=True)
    first = mp.run()
    assert first.returncode == 0, describe(first)
    assert mp.bodies() == sorted(as_lf(m) for m in msgs), describe(first)
    assert pipelined(first, b"RETR"), "mpop did not pipeline RETR:\n" + describe(first)
    assert user.contents() == sorted(msgs), "keep on must leave every message on the server"
    stored = mp.uidls_file.read_text()
    for uid in uidls(user):
        assert uid in stored, f"{uid} missing from mpop's uidls file:\n{stored}"

    second = mp.run()
    assert second.returncode == 0, describe(second)
    assert len(mp.delivered()) == len(msgs), "keep on + UIDL: a second run must fetch nothing new\n" + describe(second)
    assert b"--> RETR" not in second.stdout

    extra = message("late arrival", body=".late\r\n")
    user.deliver(extra)
    third = mp.run()
    assert third.returncode == 0, describe(third)
    assert mp.bodies() == sorted(as_lf(m) for m in msgs + [extra]), describe(third)
    assert third.stdout.count(b"--> RETR") == 1, describe(third)


@needs_mpop
def test_mpop_keep_off(server, tmp_path):
    msgs = corpus()
    user = server.add_user(messages=msgs)
    mp = Mpop(server, user, tmp_path, keep=False)
    res = mp.run()
    assert res.returncode == 0, describe(res)
    assert mp.bodies() == sorted(as_lf(m) for m in msgs), describe(res)
    assert user.files() == [], "keep off must leave the server's Maildir empty\n" + describe(res)
    again = mp.run()
    assert again.returncode == 0, describe(again)
    assert len(mp.delivered()) == len(msgs)


@needs_mpop
def test_mpop_auth_apop(server, tmp_path):
    """The same fetch with 'auth apop'.  (mpop's default 'auth on' refuses to
    log in at all without TLS: it does not pick APOP by itself.)"""
    msgs = corpus()
    user = server.add_user(messages=msgs)
    mp = Mpop(server, user, tmp_path, keep=False)
    mp.conf.write_text(mp.conf.read_text().replace("auth user\n", "auth apop\n"))
    res = mp.run()
    assert res.returncode == 0, describe(res)
    assert re.search(rb"^--> APOP " + user.name.encode() + rb" [0-9a-f]{32}\r?$", res.stdout, re.M), describe(res)
    assert mp.bodies() == sorted(as_lf(m) for m in msgs)
    assert user.files() == []


@needs_mpop
def test_mpop_auth_apop_not_offered_by_default(tmp_path):
    """Without --apop the greeting has no timestamp: mpop, told to use APOP,
    sees it is not offered and never sends it (nor the password)."""
    srv = ServerProcess(tmp_path / "srv", "cython")
    srv.start()
    try:
        user = srv.add_user(messages=[message("one")])
        mp = Mpop(srv, user, tmp_path, keep=True)
        mp.conf.write_text(mp.conf.read_text().replace("auth user\n", "auth apop\n"))
        res = mp.run()
        assert res.returncode != 0, describe(res)
        assert b"--> APOP" not in res.stdout and b"--> PASS" not in res.stdout, describe(res)
        assert re.search(rb"(?i)apop", res.stderr), describe(res)  # says why
        assert mp.delivered() == []
    finally:
        rc = srv.stop()
        assert "Traceback" not in srv.log() and rc == 0, srv.log()


@needs_mpop
def test_mpop_many_messages_pipelined(server, tmp_path):
    """Hundreds of small messages: mpop keeps many RETR and DELE in flight."""
    msgs = [message(f"n{i}", body=f".{i}\r\nline\r\n" + ".." * (i % 4) + "\r\n") for i in range(300)]
    msgs[100:100] = [dotty_big(), dot_dense()]
    msgs[200:200] = [dotty_big(b"\n")]
    user = server.add_user(messages=msgs)
    mp = Mpop(server, user, tmp_path, keep=False)
    res = mp.run()
    assert res.returncode == 0, describe(res)
    assert pipelined(res, b"RETR") and pipelined(res, b"DELE"), describe(res)
    assert mp.bodies() == sorted(as_lf(m) for m in msgs)
    assert user.files() == []
