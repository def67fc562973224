"""UIDL migrations end to end (docs/migration.md): a real fastpop serves a
Courier Maildir with Courier's UIDLs, makes UIDLs RFC 1939 forbids valid
the same way after its index is lost, and serves what ``fastpop import mbox``
brought from a spool with the X-UIDL UIDLs the old server gave; hostile
Courier files and spools harm nobody but their owner, and nothing logs a
traceback.  The parsers alone: tests/test_uidl_migration_units.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import ServerProcess, message, serving

COURIER_UIDV = 1600000000


@pytest.fixture
def srv(tmp_path):
    yield from serving(ServerProcess(tmp_path, "cython"))


def uidls(user) -> dict[str, int]:
    p = user.login_when_free()
    try:
        listed = {}
        for line in p.uidl()[1]:
            num, uidl = line.decode().split(" ", 1)
            listed[uidl] = int(num)
        return listed
    finally:
        p.quit()


def retr_all(user) -> dict[str, bytes]:
    p = user.login_when_free()
    try:
        out = {}
        for line in p.uidl()[1]:
            num, uidl = line.decode().split(" ", 1)
            lines = p.retr(int(num))[1]
            out[uidl] = b"\r\n".join(lines) + b"\r\n"
        return out
    finally:
        p.quit()


def lose_index(user) -> None:
    (user.maildir / "fastpop.index").unlink()


def put_cur(user, name: str, data: bytes) -> None:
    (user.maildir / "cur" / name).write_bytes(data)


def test_courier_maildir_keeps_courier_uidls(srv):
    user = srv.add_user()
    names = [f"{1700000000 + i}.M{i}P99.courier,S=100:2,S" if i % 2 else f"{1700000000 + i}.M{i}P99.courier:2,"
             for i in range(1, 6)]
    for i, name in enumerate(names, 1):
        put_cur(user, name, message(f"courier {i}"))
    bases = [n.split(":")[0] for n in names]
    # as Courier 4.x+ writes it: version 3; message 5 was delivered after Courier's last login
    (user.maildir / "courierpop3dsizelist").write_text(
        f"/3 5 {COURIER_UIDV}\n"
        + "".join(f"{bases[i]}:2,S 100 {i + 1}:{COURIER_UIDV}:0\n" for i in range(3))
        + f"{bases[3]} 100 0:{COURIER_UIDV}:0\n"  # UID 0: Courier served its file name
    )
    expected = [f"UID1-{COURIER_UIDV}", f"UID2-{COURIER_UIDV}", f"UID3-{COURIER_UIDV}", bases[3],
                bases[4].split(",")[0]]
    assert sorted(uidls(user).items(), key=lambda kv: kv[1]) == [(u, i) for i, u in enumerate(expected, 1)]
    lose_index(user)
    assert list(uidls(user)) == expected  # the same after the index is lost


def test_a_served_uidl_never_changes_when_a_courier_list_appears(srv):
    user = srv.add_user([message("one")])
    before = uidls(user)
    (only,) = before
    base = next((user.maildir / "cur").iterdir()).name.split(":")[0]
    (user.maildir / "courierpop3dsizelist").write_text(f"/3 2 {COURIER_UIDV}\n{base} 10 1:{COURIER_UIDV}:0\n")
    user.deliver(message("two"))  # something changes, so the index is rebuilt
    after = uidls(user)
    assert after[only] == 1 and len(after) == 2


def test_duplicate_courier_uidls_stay_unique(srv):
    user = srv.add_user()
    for i in (1, 2):
        put_cur(user, f"170000000{i}.M{i}.dup:2,", message(f"dup {i}"))
    (user.maildir / "courierpop3dsizelist").write_text(
        f"/3 2 {COURIER_UIDV}\n1700000001.M1.dup 10 1:{COURIER_UIDV}:0\n1700000002.M2.dup 10 1:{COURIER_UIDV}:0\n")
    got = list(uidls(user))
    assert got == [f"UID1-{COURIER_UIDV}", "1700000002.M2.dup"]


def test_invalid_uidls_are_replaced_the_same_way_after_index_loss(srv):
    user = srv.add_user()
    long_base = "1700000001.M1." + "h" * 80  # Courier's UIDL: its name, over 70 characters
    odd_base = "1700000002.M2.caf\u00e9 x"  # non-ASCII and a space: +XX escaped by Courier, still valid
    plain_long = "1700000003.M3." + "p" * 90  # no Courier record: fastpop's own UIDL from the name
    for base in (long_base, odd_base, plain_long):
        put_cur(user, base + ":2,", message(base[:20]))
    (user.maildir / "courierpop3dsizelist").write_bytes(
        f"/3 1 {COURIER_UIDV}\n{long_base} 10 0:{COURIER_UIDV}:0\n".encode()
        + odd_base.encode() + f" 10 0:{COURIER_UIDV}:0\n".encode())
    first = list(uidls(user))
    assert first == [hashlib.md5(long_base.encode()).hexdigest(), "1700000002.M2.caf+C3+A9+20x",
                     hashlib.md5(plain_long.encode()).hexdigest()]
    assert all(0 < len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in first)
    lose_index(user)
    assert list(uidls(user)) == first


@pytest.mark.parametrize("hostile", ["symlink", "huge-line", "garbage", "fifo", "directory"])
def test_hostile_courier_list_harms_only_its_owner(srv, tmp_path, hostile):
    victim = srv.add_user([message("victim")])
    other = srv.add_user([message("other")])
    listed = victim.maildir / "courierpop3dsizelist"
    base = next((victim.maildir / "new").iterdir()).name
    if hostile == "symlink":  # a link to a list that would rename the victim's message
        (tmp_path / "planted").write_text(f"/3 2 1\n{base} 10 1:1:0\n")
        listed.symlink_to(tmp_path / "planted")
    elif hostile == "huge-line":
        listed.write_bytes(b"/3 2 1\n" + b"A" * (3 << 20) + b" 10 1:1:0\n" + f"{base} 10 7:1:0\n".encode())
    elif hostile == "garbage":
        listed.write_bytes(os.urandom(200_000))
    elif hostile == "fifo":
        os.mkfifo(listed)
    else:
        listed.mkdir()
    got = uidls(victim)
    expected = {"huge-line": "UID7-1"}.get(hostile, base)  # a huge line is skipped alone
    assert list(got) == [expected]
    assert list(uidls(other)) == [next((other.maildir / "cur").iterdir()).name.split(":")[0]]


# -- fastpop import mbox


def run_import(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


SPOOL = (
    b"From MAILER-DAEMON Thu Dec  3 09:00:00 2026\n"  # c-client's folder data: not mail, not imported
    b"Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\nX-IMAP: 1700000000 0000000004\n\n"
    b"This text is part of the internal format of your mail folder.\n\n"
    b"From alice@example.com Thu Dec  3 10:00:00 2026\n"
    b"From: alice@example.com\nSubject: one\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\nStatus: RO\n\n"
    b"body one\nFrom here, an unquoted From_ line inside the body\n>From quoted by the MDA\n\n"
    b"From bob@example.com Thu Dec  3 11:00:00 2026\n"
    b"From: bob@example.com\nSubject: two\nX-UIDL: " + b"L" * 80 + b"\n\nbody two\n\n"
    b"From carol@example.com Thu Dec  3 12:00:00 2026\n"
    b"From: carol@example.com\nSubject: three, never served by the old server\n\nbody three\n\n"
    b"From dave@example.com Thu Dec  3 13:00:00 2026\n"
    b"From: dave@example.com\nSubject: four\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\n\n"  # a duplicate
    b"no newline at the end"
)


def expected_messages() -> list[bytes]:
    parts = [
        b"From: alice@example.com\nSubject: one\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\nStatus: RO\n\n"
        b"body one\nFrom here, an unquoted From_ line inside the body\n>From quoted by the MDA\n",
        b"From: bob@example.com\nSubject: two\nX-UIDL: " + b"L" * 80 + b"\n\nbody two\n",
        b"From: carol@example.com\nSubject: three, never served by the old server\n\nbody three\n",
        b"From: dave@example.com\nSubject: four\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\n\n"
        b"no newline at the end\n",
    ]
    return [p.replace(b"\n", b"\r\n") for p in parts]


def spool_user(srv, tmp_path, data: bytes = SPOOL):
    """A user whose Maildir the import creates, and their spool (as root:
    both the user's, uid 65534, as /var/mail/USER is)."""
    spool = tmp_path / "spool" / "mbox-user"
    spool.parent.mkdir(exist_ok=True)
    spool.write_bytes(data)
    if os.geteuid() == 0:
        os.chown(spool, 65534, 65534)
    user = srv.add_user(name="mbox-user")
    for sub in ("cur", "new", "tmp"):
        (user.maildir / sub).rmdir()
    user.maildir.rmdir()
    return user, spool


def test_mbox_import_keeps_messages_and_x_uidls(srv, tmp_path):
    user, spool = spool_user(srv, tmp_path)
    r = run_import(spool, "--maildir", user.maildir)
    assert r.returncode == 0, r.stderr
    assert "4 messages imported" in r.stdout and "Traceback" not in r.stderr
    if os.geteuid() == 0:  # delivered as a delivery would: the spool owner's files
        assert {p.stat().st_uid for p in [user.maildir, *user.maildir.rglob("*")]} == {65534}
    got = retr_all(user)
    uidl_list = list(got)
    assert uidl_list[0] == "5d41402abc4b2a76b9719d911017c592"  # X-UIDL kept
    assert uidl_list[1] == hashlib.md5(b"L" * 80).hexdigest()  # over 70: its deterministic replacement
    names = sorted(p.name.split(":")[0] for p in (user.maildir / "cur").iterdir())
    assert uidl_list[2] == names[2].split(",")[0]  # no X-UIDL: fastpop's own
    assert uidl_list[3] == names[3].split(",")[0]  # a duplicate X-UIDL: fastpop's own
    assert list(got.values()) == expected_messages()
    # the UIDLs survive the loss of the index (pinned in dovecot-uidlist)
    lose_index(user)
    assert list(uidls(user)) == uidl_list
    # a second run imports nothing again; the spool is untouched
    r = run_import(spool, "--maildir", user.maildir)
    assert r.returncode == 0 and "0 messages imported" in r.stdout and "4 imported before" in r.stdout, r
    assert spool.read_bytes() == SPOOL
    assert list(uidls(user)) == uidl_list


def test_mbox_import_mboxrd_and_remove(srv, tmp_path):
    user, spool = spool_user(srv, tmp_path, b"From a@b Thu Dec  3 10:00:00 2026\nSubject: rd\n\n>From x\n>>From y\n")
    r = run_import(spool, "--maildir", user.maildir, "--quoting", "mboxrd", "--remove-mbox")
    assert r.returncode == 0, r.stderr
    assert "spool emptied" in r.stdout
    assert spool.exists() and spool.stat().st_size == 0  # emptied, not removed: owner and mode stay
    assert list(retr_all(user).values()) == [b"Subject: rd\r\n\r\nFrom x\r\n>From y\r\n"]


@pytest.mark.parametrize("hostile", ["symlink", "garbage", "hardlink", "too-large"])
def test_hostile_spool_is_refused_cleanly(srv, tmp_path, hostile):
    user, spool = spool_user(srv, tmp_path)
    extra: list[str] = []
    if hostile == "symlink":  # /var/mail/USER made a link to another's file
        secret = tmp_path / "secret"
        secret.write_bytes(SPOOL)
        spool.unlink()
        spool.symlink_to(secret)
    elif hostile == "garbage":
        spool.write_bytes(os.urandom(100_000).replace(b"From ", b"xxxxx"))
    elif hostile == "hardlink":
        os.link(spool, tmp_path / "second-name")
    else:
        extra = ["--max-message-size", "100"]
    r = run_import(spool, "--maildir", user.maildir, "--remove-mbox", *extra)
    assert r.returncode == 1
    assert "nothing imported" in r.stderr and "Traceback" not in r.stderr
    assert not user.maildir.exists()  # nothing written
    if hostile != "symlink":
        assert spool.stat().st_size > 0


def test_import_mbox_help():
    r = subprocess.run([sys.executable, "-m", "fastpop", "import", "mbox", "--help"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "--remove-mbox" in r.stdout and Path(__file__).exists()


def test_courier_uidls_are_pinned_in_dovecot_uidlist(tmp_path):
    """[mail] uidl = "dovecot": Courier's UIDLs become P fields of dovecot-uidlist, so Dovecot's POP3
    serves them too and they no longer depend on courierpop3dsizelist or fastpop's index."""
    gen = serving(ServerProcess(tmp_path, "cython", extra_args=["--mail-uidl", "dovecot"]))
    srv = next(gen)
    try:
        user = srv.add_user()
        put_cur(user, "1700000001.M1.c:2,S", message("one"))
        put_cur(user, "1700000002.M2.c:2,", message("two"))
        (user.maildir / "courierpop3dsizelist").write_text(
            f"/3 2 {COURIER_UIDV}\n1700000001.M1.c 10 1:{COURIER_UIDV}:0\n")
        first = list(uidls(user))
        assert first[0] == f"UID1-{COURIER_UIDV}" and len(first) == 2
        uidlist = (user.maildir / "dovecot-uidlist").read_text()
        assert f"P{first[0]} :1700000001.M1.c\n" in uidlist
        (user.maildir / "courierpop3dsizelist").unlink()
        lose_index(user)
        assert list(uidls(user)) == first
    finally:
        next(gen, None)


def test_x_uidl_headers_of_a_converted_maildir(srv):
    """A Maildir made from an mbox by another tool (mb2md keeps the headers): ``fastpop import
    x-uidl`` makes each X-UIDL the message's UIDL before fastpop serves it; mail that arrives
    later is never read for one, so a sender cannot forge a UIDL to hide a message."""
    user = srv.add_user()
    put_cur(user, "1700000001.M1.mb2md:2,S", b"X-UIDL: 0123456789abcdef\nSubject: a\n\nbody\n")
    put_cur(user, "1700000002.M2.mb2md:2,", b"Subject: b\nX-Uidl:  tab\tand space \n\nbody\n")
    put_cur(user, "1700000003.M3.mb2md:2,", b"Subject: c\n\nX-UIDL: only in the body\n")
    put_cur(user, "1700000004.M4.mb2md:2,", b"X-UIDL: 0123456789abcdef\nSubject: a duplicate\n\n")
    r = subprocess.run([sys.executable, "-m", "fastpop", "import", "x-uidl", str(user.maildir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "2 X-UIDLs pinned" in r.stdout, r
    expected = ["0123456789abcdef", hashlib.md5(b"tab\tand space").hexdigest(), "1700000003.M3.mb2md",
                "1700000004.M4.mb2md"]
    assert list(uidls(user)) == expected
    forged = user.deliver(b"X-UIDL: 0123456789abcdef\nSubject: forged\n\n")  # after the move
    lose_index(user)
    assert sorted(uidls(user)) == sorted([*expected, forged.name])  # the forged one: its own UIDL


def test_courier_uidl_wins_over_dovecot_imap_uids(srv):
    """Courier POP3 beside Dovecot IMAP: the POP3 clients have Courier's UIDLs, not Dovecot's."""
    user = srv.add_user()
    put_cur(user, "1700000001.M1.both:2,S", message("one"))
    put_cur(user, "1700000002.M2.both:2,", message("two"))
    (user.maildir / "dovecot-uidlist").write_text("3 V1234 N3 Gabc\n1 :1700000001.M1.both\n2 :1700000002.M2.both\n")
    (user.maildir / "courierpop3dsizelist").write_text(
        f"/3 2 {COURIER_UIDV}\n1700000001.M1.both 10 1:{COURIER_UIDV}:0\n")
    assert list(uidls(user)) == [f"UID1-{COURIER_UIDV}", f"{2:08x}{1234:08x}"]
