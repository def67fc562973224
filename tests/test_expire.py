"""EXPIRE that happens (RFC 2449 section 6.7, issue 20 item 3): a message
retrieved in a session that ended with QUIT is deleted ``expire`` days
later, at the user's next login (before STAT) or by the ``fastpop expire``
sweep; EXPIRE 0 deletes at QUIT; per-user values from the user database,
shown in CAPA after login.  Time is simulated by dating the on-disk record
(fastpop.retrieved) in the past: nothing sleeps for days."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from support.server import PARSERS, ServerProcess, message, serving

DAY = 86400


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def srv(request, tmp_path_factory):
    yield from serving(ServerProcess(tmp_path_factory.mktemp("expire"), PARSERS[request.param],
                                     extra_args=["--expire", "3", "--expire-per-user"]))


def record(user) -> dict[str, int]:
    path = user.maildir / "fastpop.retrieved"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        stamp, uidl = line.split(" ", 1)
        out[uidl] = int(stamp)
    return out


def age(user, days: float) -> None:
    """Date every retrieval of the record ``days`` earlier (the simulated clock)."""
    rec = record(user)
    assert rec, "nothing recorded"
    text = "".join(f"{int(t - days * DAY)} {u}\n" for u, t in rec.items())
    (user.maildir / "fastpop.retrieved").write_text(text)


def uidls(p) -> list[bytes]:
    return [line.split()[1] for line in p.uidl()[1]]


def capa(p) -> list[str]:
    return [line.decode() for line in p._longcmd("CAPA")[1]]


def test_retrieved_message_expires_at_a_later_login_before_stat(srv):
    user = srv.add_user([message("one"), message("two"), message("three")])
    p = user.login()
    assert "EXPIRE 3" in capa(p)  # after login: no USER, this user's value is the default
    all_uidls = uidls(p)
    p.retr(1)
    p.top(2, 0)  # TOP is not a retrieval
    p.quit()
    rec = record(user)
    assert list(rec) == [all_uidls[0].decode()]
    assert abs(rec[all_uidls[0].decode()] - time.time()) < 60

    # two days later: not yet
    age(user, 2)
    p = user.login_when_free()
    assert p.stat()[0] == 3
    p.quit()
    # three days after the retrieval: gone before the client sees anything
    age(user, 1.01)
    p = user.login_when_free()
    assert p.stat()[0] == 2
    assert uidls(p) == all_uidls[1:]
    assert b"Subject: two" in b"\r\n".join(p.retr(1)[1])
    p.rset()
    p.quit()
    assert sorted(c.split(b"Subject: ")[1][:5] for c in user.contents()) == [b"three", b"two\r\n"]
    assert all_uidls[0].decode() not in record(user)


def test_a_message_never_retrieved_is_never_expired(srv):
    user = srv.add_user([message("kept"), message("read")])
    old = time.time() - 400 * DAY
    for f in user.files():  # old files and old deliveries: age alone never expires
        os.utime(f, (old, old))
    p = user.login()
    p.top(1, 0)
    p.retr(2)
    p.quit()
    age(user, 30)
    p = user.login_when_free()
    assert p.stat()[0] == 1
    assert b"Subject: kept" in b"\r\n".join(p.retr(1)[1])
    # a RETR in a session that does not end with QUIT records nothing
    p.close()
    time.sleep(0.2)
    assert record(user) == {}
    p = user.login_when_free()
    assert p.stat()[0] == 1
    p.quit()


def test_dele_and_rset(srv):
    """A message retrieved then deleted is not recorded; RSET does not undo a download."""
    user = srv.add_user([message("a"), message("b")])
    p = user.login()
    ids = uidls(p)
    p.retr(1)
    p.retr(2)
    p.rset()
    p.dele(2)
    p.quit()
    assert list(record(user)) == [ids[0].decode()]


def test_expire_zero_per_user_deletes_retrieved_messages_at_quit(srv):
    user = srv.add_user([message("x"), message("y")], password="pw", stored="{PLAIN}pw::::::pop3_expire=0")
    p = srv.connect()
    assert "EXPIRE 3 USER" in capa(p)  # AUTHORIZATION: the server's default, varying per user
    p.user(user.name)
    p.pass_("pw")
    assert "EXPIRE 0" in capa(p)  # RFC 2449: this user's own value, 0 shown as 0
    p.retr(2)
    p.quit()
    assert [c.split(b"Subject: ")[1][:1] for c in user.contents()] == [b"x"]
    assert record(user) == {}


def test_per_user_never_records_nothing(srv):
    user = srv.add_user([message("n")], password="pw", stored="{PLAIN}pw::::::pop3_expire=NEVER")
    p = srv.connect()
    p.user(user.name)
    p.pass_("pw")
    assert "EXPIRE NEVER" in capa(p)
    p.retr(1)
    p.quit()
    assert not (user.maildir / "fastpop.retrieved").exists()
    assert len(user.files()) == 1


def test_a_bad_per_user_value_deletes_nothing(srv):
    user = srv.add_user([message("n")], password="pw", stored="{PLAIN}pw::::::pop3_expire=soon")
    p = user.login()
    assert "EXPIRE NEVER" in capa(p)
    p.retr(1)
    p.quit()
    assert len(user.files()) == 1


def test_a_record_is_never_followed_through_a_link(srv, tmp_path):
    """The record is the user's file: a link planted as it is not read nor written through."""
    user = srv.add_user([message("l")])
    target = tmp_path / "elsewhere"
    target.write_text("")
    (user.maildir / "fastpop.retrieved").symlink_to(target)
    p = user.login()
    p.retr(1)
    p.quit()
    assert target.read_text() == ""
    assert len(user.files()) == 1


def run_expire(srv, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "fastpop", "expire", "--passwd-file", str(srv.passwd),
         "--mail-location", str(srv.mail) + "/%u", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=srv.root)


def test_sweep_expires_and_skips_a_mailbox_in_use(srv):
    busy = srv.add_user([message("b1"), message("b2")])
    idle = srv.add_user([message("i1"), message("i2")])
    for user in (busy, idle):
        p = user.login()
        p.retr(1)
        p.quit()
        age(user, 2)  # not yet due for the server's EXPIRE 3: the login below keeps it
    session = busy.login_when_free()  # a live session holds busy's mailbox
    try:
        out = run_expire(srv, "--days", "1", busy.name, idle.name)
        assert out.returncode == 0, out.stderr
        assert f"{busy.name}: in use, skipped" in out.stdout
        assert f"{idle.name}: expired 1" in out.stdout
        assert len(busy.files()) == 2
        assert len(idle.files()) == 1
        assert session.stat()[0] == 2  # the session's view is untouched
    finally:
        session.quit()
    # the next run, with the mailbox free, does it
    out = run_expire(srv, "--days", "1", busy.name)
    assert f"{busy.name}: expired 1" in out.stdout, out.stdout + out.stderr
    p = busy.login_when_free()
    assert p.stat()[0] == 1
    p.quit()


def test_sweep_over_the_whole_user_database_uses_each_users_value(srv):
    user = srv.add_user([message("s")], password="pw", stored="{PLAIN}pw::::::pop3_expire=1")
    never = srv.add_user([message("t")], password="pw", stored="{PLAIN}pw::::::pop3_expire=NEVER")
    p = user.login()
    p.retr(1)
    p.quit()
    age(user, 1.5)
    # never's record planted by hand: its NEVER means the sweep leaves it alone
    p = never.login()
    uid = uidls(p)[0].decode()
    p.quit()
    (never.maildir / "fastpop.retrieved").write_text(f"{int(time.time() - 99 * DAY)} {uid}\n")
    out = run_expire(srv, "--quiet")
    assert out.returncode == 0, out.stderr
    assert f"{user.name}: expired 1" in out.stdout
    assert never.name not in out.stdout
    assert user.files() == []
    assert len(never.files()) == 1


def test_with_an_index_directory_the_record_is_out_of_the_users_reach(tmp_path):
    """[mail] index set: the record lives there (<hash>.retrieved), not in the Maildir, and
    both the login and the sweep (given the same --config) use it."""
    index_dir = tmp_path / "index"
    conf = tmp_path / "fastpop.toml"
    conf.write_text(f'[mail]\nindex = "{index_dir}"\n[pop3]\nexpire = "2"\n')
    srv = ServerProcess(tmp_path / "srv", "cython", extra_args=["--config", str(conf)])
    for _ in serving(srv):
        user = srv.add_user([message("a"), message("b")])
        other = srv.add_user([message("c")])
        for u in (user, other):
            p = u.login()
            p.retr(1)
            p.quit()
        assert not (user.maildir / "fastpop.retrieved").exists()
        records = sorted(index_dir.glob("*.retrieved"))
        assert len(records) == 2
        # age both records by 3 days
        for path in records:
            stamp, uidl = path.read_text().split()
            path.write_text(f"{int(stamp) - 3 * DAY} {uidl}\n")
        p = user.login_when_free()
        assert p.stat()[0] == 1
        p.quit()
        out = run_expire(srv, "--config", str(conf), other.name)
        assert out.returncode == 0 and f"{other.name}: expired 1" in out.stdout, out.stdout + out.stderr
        assert other.files() == []
        assert sorted(index_dir.glob("*.retrieved")) == []


def test_a_master_users_retrievals_are_not_the_users(tmp_path):
    """An administrator reading a mailbox as user*admin deletes nothing with EXPIRE 0 and
    records nothing: only the user's own downloads count."""
    (tmp_path / "masters").write_text("admin:{PLAIN}master pw\n")
    srv = ServerProcess(tmp_path / "srv", "cython",
                        extra_args=["--auth-master-passwd-file", str(tmp_path / "masters")])
    for _ in serving(srv):
        zero = srv.add_user([message("z")], password="pw", stored="{PLAIN}pw::::::pop3_expire=0")
        later = srv.add_user([message("l")], password="pw", stored="{PLAIN}pw::::::pop3_expire=3")
        for u in (zero, later):
            p = srv.connect()
            p.user(f"{u.name}*admin")
            p.pass_("master pw")
            p.retr(1)
            p.quit()
        assert len(zero.files()) == 1
        assert not (later.maildir / "fastpop.retrieved").exists()
        p = zero.login_when_free()  # the user's own RETR does it
        p.retr(1)
        p.quit()
        assert zero.files() == []


def test_sweep_of_given_maildirs_and_bad_arguments(srv):
    user = srv.add_user([message("m1"), message("m2")])
    p = user.login()
    p.retr(2)
    p.quit()
    age(user, 1)
    out = run_expire(srv, "--maildir", str(user.maildir), "--days", "1")
    assert out.returncode == 0 and f"{user.maildir}: expired 1" in out.stdout, out.stdout + out.stderr
    assert [c.split(b"Subject: ")[1][:2] for c in user.contents()] == [b"m1"]
    assert run_expire(srv, "nobody-here").returncode == 64
    bad = run_expire(srv, "--days", "soon")
    assert bad.returncode == 64 and "NEVER or a number of days" in bad.stderr
    assert "Traceback" not in bad.stderr
