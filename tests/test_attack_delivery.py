"""Delivery attacked (fastpop deliver, LMTP, maildirsize): a user's own
Maildir files and an LMTP client's bytes are hostile input.  Each test runs
the attack against a real fastpop (LMTP over TCP on 127.0.0.1, or ``fastpop
deliver`` in a subprocess) and checks the documented outcome."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from support.server import AS_ROOT, message, serving
from test_lmtp import RawLMTP
from test_quota import LMTPServer, deliver, lmtp_send


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    yield from serving(LMTPServer(tmp_path_factory.mktemp("atkdeliv"), "cython",
                                  extra_args=["--lmtp-listen", "127.0.0.1:0"]))


def raw(srv) -> RawLMTP:
    return RawLMTP(socket.create_connection(("127.0.0.1", srv.lmtp_port), timeout=10))


# -- maildirsize with numbers too long to print


def huge_quota(user) -> None:
    """A valid quota definition and usage lines of 4299-digit numbers: their
    sum has more digits than Python will turn into a string (4300)."""
    line = "9" * 4299 + " 1\n"
    (user.maildir / "maildirsize").write_text("1000S,10C\n" + line * 20)


def test_huge_usage_numbers_in_maildirsize_do_not_bounce_lmtp_mail(srv):
    """Old code: the 'over quota' reason formatted the sum, ValueError (int
    to str past 4300 digits) escaped, LMTP answered 451 Internal error for
    every delivery to the user, for ever.  A quota file whose numbers make
    no sense enforces nothing (docs/delivery.md)."""
    user = srv.add_user()
    huge_quota(user)
    code, text = lmtp_send(srv, user, message("hello"))
    assert code == 250, text
    assert len(list((user.maildir / "new").iterdir())) == 1


def test_huge_usage_numbers_in_maildirsize_do_not_make_deliver_exit_70(srv):
    """Old code: fastpop deliver exited 70 (EX_SOFTWARE), which Postfix's
    pipe(8) treats as a permanent failure: the mail bounced."""
    user = srv.add_user()
    huge_quota(user)
    r = deliver(srv, user, message("hello"))
    assert r.returncode == 0, r.stderr
    assert len(list((user.maildir / "new").iterdir())) == 1


# -- LMTP command parameters


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1\u00b3"])
def test_non_ascii_digits_in_mail_size_are_501_not_a_dropped_connection(srv, value):
    """Old code: str.isdigit() took "²", int() refused it, ValueError left
    data_received and the transport was torn down without a reply."""
    c = raw(srv)
    try:
        c.send(f"LHLO x\r\nMAIL FROM:<a@example.com> SIZE={value}\r\nNOOP\r\n".encode())
        assert c.reply().startswith("250-")
        assert c.reply().startswith("501 5.5.4"), "the MAIL with a bad SIZE"
        assert c.reply().startswith("250 "), "the session goes on"
    finally:
        c.close()


# -- durability of the directories a first delivery creates


def test_every_directory_a_first_delivery_creates_is_fsynced_in_its_parent(tmp_path):
    """A first message for a new domain makes ``mail/<domain>/<user>/Maildir``:
    old code fsync'ed the Maildir and its parent only, so ``<domain>``'s entry
    in ``mail/`` (and ``mail``'s in the root) could vanish in a crash after
    ``fastpop deliver`` had exited 0: a message reported stored, lost.  Checked
    with strace(1): every mkdir's parent is fsync'ed after it, before the exit."""
    if not shutil.which("strace"):
        pytest.skip("no strace")
    passwd = tmp_path / "passwd"
    passwd.write_text("bob@dom.example:{PLAIN}x\n")
    trace = tmp_path / "trace"
    r = subprocess.run(
        ["strace", "-f", "-y", "-qq", "-e", "trace=mkdir,mkdirat,fsync", "-o", str(trace),
         sys.executable, "-m", "fastpop", "deliver", *AS_ROOT, "--user", "bob@dom.example",
         "--passwd-file", str(passwd), "--mail-location", f"{tmp_path}/mail/%d/%n/Maildir"],
        input=message("first"), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    created: list[str] = []
    synced: set[str] = set()
    for line in trace.read_text().splitlines():
        m = re.search(r'\bmkdir\("([^"]+)", \S+\) = 0', line)
        if m:
            created.append(m.group(1))
        m = re.search(r'\bmkdirat\(\d+<([^>]+)>, "([^"]+)", \S+\) = 0', line)
        if m:
            created.append(f"{m.group(1)}/{m.group(2)}")
        m = re.search(r"\bfsync\(\d+<([^>]+)>\) = 0", line)
        if m:
            synced.add(m.group(1))
    assert f"{tmp_path}/mail" in created, created
    unsynced = sorted(os.path.dirname(d) for d in created if os.path.dirname(d) not in synced)
    assert not unsynced, f"created names whose directory was never fsync'ed: {unsynced}"


# -- a huge Maildir and a maildirsize kept large: recalculation in every store thread


def lmtp_timed(srv, user, data: bytes) -> tuple[int, float]:
    start = time.monotonic()
    code, _text = lmtp_send(srv, user, data)
    return code, time.monotonic() - start


def test_a_user_cannot_hold_every_store_thread_with_quota_recalculations(srv):
    """The attacker fills cur/ with 300,000 names (hard links: cheap) and keeps
    maildirsize over 5120 bytes, so each delivery to them rescans the Maildir
    (about a second), then sends itself mail over 8 connections at once.  Old
    code: every store thread (4) scanned, and the victim's delivery, whose
    content is prepared and stored in the same threads, waited seconds.  Now a
    Maildir is recalculated by one delivery at a time; the others take the
    file's figures."""
    attacker, victim = srv.add_user(), srv.add_user()
    cur = attacker.maildir / "cur"
    for k in range(5):
        source = attacker.maildir / f"source{k}"
        source.write_bytes(b"x")
        for i in range(60000):
            os.link(source, cur / f"{k}.{i}.M1P1.h,S=1")
        source.unlink()
    quotafile = attacker.maildir / "maildirsize"
    padding = "1 1\n" * 1600  # 6400 bytes: over RECALC_BYTES

    def grow() -> None:
        if quotafile.stat().st_size < 5200:
            with open(quotafile, "a") as f:
                f.write(padding)

    quotafile.write_text("999999999999S\n" + padding)
    assert lmtp_timed(srv, victim, message("warm"))[0] == 250
    code, alone = lmtp_timed(srv, attacker, message("one"))
    assert code == 250
    assert alone > 0.3, f"a recalculation took only {alone:.2f} s: the attack has no teeth here"

    stop = threading.Event()
    failures: list[object] = []

    def attack() -> None:
        while not stop.is_set():
            grow()
            try:
                lmtp_send(srv, attacker, message("flood"))
            except Exception as exc:  # reported below
                failures.append(exc)
                return

    def keep_large() -> None:
        while not stop.is_set():
            grow()
            time.sleep(0.005)

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=keep_large, daemon=True))
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)  # every store thread busy, on the old code
        waits = []
        for i in range(3):
            code, took = lmtp_timed(srv, victim, message(f"victim {i}"))
            assert code == 250
            waits.append(took)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not failures, failures
    assert max(waits) < alone, f"the victim waited {waits} s; one recalculation takes {alone:.2f} s"


def test_a_recalculated_maildirsize_counts_a_name_with_an_absurd_size_by_its_file(srv):
    """A name claiming S= of 200 digits: the recalculation counts the file's
    size instead, so the line it writes is one the next delivery reads (a line
    of more than 18 digits is skipped) and the quota still holds."""
    user = srv.add_user()
    (user.maildir / "cur" / ("1.M1P1.h,S=" + "9" * 200 + ":2,")).write_bytes(b"x" * 900)
    (user.maildir / "maildirsize").write_text("1000S\n" + "0 0\n" * 1500)  # large: recalculated
    code, text = lmtp_send(srv, user, message("over", size=500))
    assert (code, text[:6]) == (452, b"4.2.2 "), text
    assert (user.maildir / "maildirsize").read_text().splitlines()[1:] == ["900 1"]


# -- LMTP: DATA held by many connections at once


def test_lmtp_data_held_by_all_connections_is_bounded(srv):
    """Eight connections each send 63 MiB of DATA and keep the final "."
    back.  Old code: the server held all of it, and any number more (up to
    [lmtp] max_connections, 100: 6 GiB, and copies while storing): one local
    user with a TCP connection to LMTP could take the host's memory.  Now the
    connections of a process hold at most DATA_BUDGET (512 MiB): a message past
    it is read, dropped and answered 452 4.3.1 (the MTA retries), and what a
    connection held is given back when it goes."""
    from fastpop.delivery import lmtp

    user = srv.add_user()
    chunk = (b"x" * 1022 + b"\r\n") * 1024  # 1 MiB
    holders = []
    try:
        for _ in range(8):
            c = raw(srv)
            assert c.start(user.name)[-1].startswith("354")
            for _ in range(63):
                c.send(chunk)
            holders.append(c)
        time.sleep(2)  # let the server read what the sockets still buffer
        probe = raw(srv)
        try:
            assert probe.start(user.name)[-1].startswith("354")
            for _ in range(20):
                probe.send(chunk)
            probe.send(b".\r\n")
            reply = probe.reply()
            assert reply.startswith("452 4.3.1"), reply
        finally:
            probe.close()
        assert not list((user.maildir / "new").iterdir())
    finally:
        for c in holders:
            c.close()
    assert lmtp.DATA_BUDGET < 8 * 63 * (1 << 20) + 20 * (1 << 20)
    deadline = time.monotonic() + 10  # the holders' octets are given back when they go
    while True:
        code, text = lmtp_send(srv, user, message("after", size=10 << 20))
        if code == 250 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 250, text
