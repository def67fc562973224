"""Started as root with --user, the server binds first and then runs as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
from support.server import NO_EXTENSIONS, ServerProcess, mailbox_held, message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.fixture
def world_reachable_dir():
    # pytest's tmp_path sits below a 0700 root directory that "nobody" cannot enter
    path = Path(tempfile.mkdtemp(prefix="fastpop-priv-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("lock", ["table", "symlink"])
def test_drops_to_user_after_binding(world_reachable_dir, lock):
    nobody = pwd.getpwnam("nobody")
    root = world_reachable_dir
    srv = ServerProcess(root, "cython", extra_args=["--user", "nobody", "--mail-lock", lock])
    user = srv.add_user([message("hi")])
    for path in [srv.mail, *srv.mail.rglob("*"), srv.passwd]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    srv.start()
    try:
        assert set(_uids(srv.proc.pid)) == {nobody.pw_uid}
        p = user.login()
        assert p.stat()[0] == 1
        if lock == "table":  # opened as root before the drop, held by the dropped process
            assert mailbox_held(user.maildir)
            p.quit()
            assert not mailbox_held(user.maildir)
        else:
            link = user.maildir / "fastpop.lock"
            assert link.lstat().st_uid == nobody.pw_uid  # created by the dropped user
            p.quit()
            assert not os.path.lexists(link)  # removed at logout
    finally:
        assert srv.stop() == 0


def test_unknown_user_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    (tmp_path / "passwd").touch()
    r = subprocess.run(
        [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--passwd-file",
         str(tmp_path / "passwd"), "--user", "no-such-user-fastpop"],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert "no such system user" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_listener_accepts_before_privileges_are_dropped(tmp_path):
    """Ports are bound as root, but a listener only starts listening (and so a
    client is only ever served) after setuid: a connection that arrived while
    LMTP or metrics were still starting was served as root, and a login then
    created that user's Maildir owned by root."""
    import re
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "passwd").touch()
    trace = tmp_path / "trace"
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=listen,setuid", "-o", str(trace),
         sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--lmtp-listen", "127.0.0.1:0",
         "--passwd-file", str(tmp_path / "passwd"), "--mail-location", str(tmp_path / "%u"),
         "--user", "nobody", "--workers", "1", "--control-socket", str(tmp_path / "run" / "control.sock")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (m := re.search(r"listening on .*pid (\d+)\)", err := proc.stderr.readline())):
            assert err and time.monotonic() < deadline, "fastpop did not start"
        os.kill(int(m.group(1)), signal.SIGTERM)  # strace ends with it
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    calls = [m.group(1) for line in trace.read_text().splitlines() if (m := re.search(r"\b(listen|setuid)\(", line))]
    assert calls.count("listen") == 3, calls  # POP3, LMTP and the control socket
    assert "setuid" in calls and calls.index("setuid") < calls.index("listen"), calls


# ----------------------------------------------------------------- nothing loaded after the switch of user

# Imported by every server process started with FASTPOP_TEST_LATE_IMPORTS set (sitecustomize
# is imported at start from the first directory of PYTHONPATH that has one): each import
# that reaches the import system after the switch of user fails, as it fails where the
# installation is unreadable, and is written down.
LATE_IMPORT_HOOK = '''
import os
import sys

_path = os.environ.get("FASTPOP_TEST_LATE_IMPORTS")
if _path:
    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _late_import(event, args):
        if event == "import" and os.geteuid() != 0:
            os.write(_fd, f"{os.getpid()} {args[0]}\\n".encode())
            raise ModuleNotFoundError(f"{args[0]}: imported after the switch of user", name=args[0])

    sys.addaudithook(_late_import)
'''


@pytest.fixture
def unreadable_install(monkeypatch, world_reachable_dir):
    """fastpop importable only from a directory of root's that the server's user
    cannot read (its .so files too), and an audit hook there that fails any import
    after the switch of user; returns (that directory, the file listing late imports)."""
    import importlib.util

    import fastpop

    private = Path(tempfile.mkdtemp(prefix="fastpop-install-"))  # 0700, root's
    try:
        shutil.copytree(Path(fastpop.__file__).parent, private / "fastpop",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        hook = LATE_IMPORT_HOOK
        existing = importlib.util.find_spec("sitecustomize")
        if existing is not None and existing.origin:  # the installation's own runs first
            hook = f"exec(compile(open({existing.origin!r}).read(), {existing.origin!r}, 'exec'))\n" + hook
        (private / "sitecustomize.py").write_text(hook)
        late = world_reachable_dir / "late-imports"
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(private), os.environ.get("PYTHONPATH")])))
        monkeypatch.setenv("FASTPOP_TEST_LATE_IMPORTS", str(late))
        monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        yield private, late
    finally:
        shutil.rmtree(private)


def _served_from(pid: int, private: Path) -> bool:
    """Whether process ``pid`` runs the compiled modules of the private copy
    (the twins only: nothing to see, PYTHONPATH chose it all the same)."""
    if NO_EXTENSIONS:
        return True
    with open(f"/proc/{pid}/maps") as f:
        return f"{private}/fastpop/" in f.read()


def _give(path: Path, owner: pwd.struct_passwd) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, owner.pw_uid, owner.pw_gid)


def _late_problems(srv: ServerProcess, late: Path) -> str:
    text = late.read_text() if late.exists() else ""
    log = srv.log()
    bad = [line for line in log.splitlines() if "ModuleNotFoundError" in line or "Permission denied" in line
           or "Traceback" in line]
    return (f"imported after the switch of user:\n{text}" if text else "") + "\n".join(bad)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_mechanism_works_from_an_installation_the_user_cannot_read(world_reachable_dir, unreadable_install,
                                                                           workers):
    """Started as root with --user nobody, fastpop imported from a directory nobody
    cannot read: USER/PASS with every password scheme, APOP, SASL PLAIN, LOGIN,
    SCRAM-SHA-256 (stored and derived keys), OAUTHBEARER and XOAUTH2 (hmac
    validator, its secret readable by root only), SASLprep, STLS and implicit
    TLS, LMTP delivery, the metrics endpoint, and all of it again after SIGHUP.
    Each of them used to import a module (or read a file) at first use, after
    the switch of user, and failed there."""
    import re
    import signal
    import smtplib
    import time
    import urllib.request

    from scramp import ScramClient
    from support.tls import Certs, Conn, b64, unb64

    from fastpop.auth.oauth import make_token
    from fastpop.auth.passwords import hash_password
    from fastpop.auth.sasl import make_scram_keys

    private, late = unreadable_install
    nobody = pwd.getpwnam("nobody")
    root = world_reachable_dir
    certs = Certs(root / "certs")
    _give(root / "certs", nobody)  # (re-read on SIGHUP, as nobody)
    secret = b"an oauth secret of root's only, 32+"
    keys = root / "keys"  # root's only: the hmac validator's secret is read before the switch
    keys.mkdir(mode=0o700)
    (keys / "oauth.key").write_bytes(secret)
    (keys / "oauth.key").chmod(0o600)
    stored = {
        "plain": "{PLAIN}pw-plain",
        "ssha": hash_password("pw-ssha", "SSHA256"),
        "argon": hash_password("pw-argon", "ARGON2ID") + "::::::scram_sha256=" + make_scram_keys("pw-argon"),
        "blf": hash_password("pw-blf", "BLF-CRYPT"),
        "sha512": hash_password("pw-sha512", "SHA512-CRYPT"),
        "prep": hash_password("IX", "SSHA256"),  # sent as I<soft hyphen>X: SASLprep maps it to IX
    }
    passwords = {"plain": "pw-plain", "ssha": "pw-ssha", "argon": "pw-argon", "blf": "pw-blf",
                 "sha512": "pw-sha512", "prep": "I\u00adX"}
    srv = ServerProcess(root, "cython", extra_args=[
        "--user", "nobody", "--workers", str(workers), "--apop",
        "--listen-tls", "127.0.0.1:0", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
        "--lmtp-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--auth-mechanisms", "PLAIN,LOGIN,SCRAM-SHA-256,OAUTHBEARER,XOAUTH2",
        "--oauth-validator", "hmac", "--oauth-secret-file", str(keys / "oauth.key"),
        "--auth-secret-file", str(private / "auth.key"), "--auth-failure-delay", "0",
    ])
    users = {name: srv.add_user([message(name)], name=name, stored=value) for name, value in stored.items()}
    for name, user in users.items():
        user.password = passwords[name]
    _give(srv.mail, nobody)
    os.chown(srv.passwd, nobody.pw_uid, nobody.pw_gid)
    srv.start()
    try:
        tls_port = int(re.search(r"TLS listening on 127\.0\.0\.1:(\d+)", srv.log()).group(1))
        lmtp_port = int(re.search(r"LMTP listening on 127\.0\.0\.1:(\d+)", srv.log()).group(1))
        metrics = re.search(r"metrics on http://(127\.0\.0\.1:\d+)", srv.log()).group(1)
        server_pids = [srv.proc.pid]
        if workers > 1:
            server_pids = [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", srv.log())]
        assert all(_served_from(pid, private) for pid in server_pids)
        assert all(set(_uids(pid)) == {nobody.pw_uid} for pid in server_pids)
        token = make_token(secret, users["plain"].name)

        def every_way_in(round_: int) -> None:
            for user in users.values():  # USER/PASS: every scheme
                if user.name == "prep":
                    continue
                p = user.login()
                assert p.stat()[0] >= 1
                p.quit()
            p = srv.connect()
            p.apop(users["plain"].name, users["plain"].password)
            p.quit()
            plain, argon = users["plain"], users["argon"]
            for mechanism, steps in [
                ("PLAIN", [b64(f"\0{plain.name}\0{plain.password}")]),
                ("PLAIN", [b64(f"\0prep\0{users['prep'].password}")]),  # SASLprep (scramp)
                ("LOGIN", [None, b64(plain.name), b64(plain.password)]),
                ("OAUTHBEARER", [b64(f"n,a={plain.name},\x01auth=Bearer {token}\x01\x01")]),
                ("XOAUTH2", [b64(f"user={plain.name}\x01auth=Bearer {token}\x01\x01")]),
            ]:
                c = Conn(srv.port)
                line = c.cmd(f"AUTH {mechanism}" + (f" {steps[0]}" if steps[0] else ""))
                for step in steps[1:]:
                    assert line.startswith(b"+ "), (mechanism, line)
                    line = c.cmd(step)
                assert line.startswith(b"+OK"), (mechanism, line)
                c.cmd("QUIT")
                c.close()
            for user in (argon, plain):  # SCRAM: stored keys, then keys derived from the clear-text password
                client = ScramClient(["SCRAM-SHA-256"], user.name, user.password)
                c = Conn(srv.port)
                client.set_server_first(unb64(c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))).decode())
                client.set_server_final(unb64(c.cmd(b64(client.get_client_final()))).decode())
                assert c.cmd("").startswith(b"+OK"), user.name
                c.cmd("QUIT")
                c.close()
            c = Conn(srv.port)  # STLS
            assert c.cmd("STLS").startswith(b"+OK")
            c.starttls(certs.client_context())
            assert c.cmd(f"USER {plain.name}").startswith(b"+OK")
            assert c.cmd(f"PASS {plain.password}").startswith(b"+OK")
            c.cmd("QUIT")
            c.close()
            with smtplib.LMTP("127.0.0.1", lmtp_port, timeout=10) as lmtp:  # LMTP, then read over implicit TLS
                assert lmtp.sendmail("a@example.com", [plain.name], message(f"lmtp {round_}")) == {}
            c = Conn(tls_port, tls=certs.client_context())
            assert c.cmd(f"USER {plain.name}").startswith(b"+OK")
            assert c.cmd(f"PASS {plain.password}").startswith(b"+OK")
            listed = c.multi("LIST")
            assert len(listed) == 1 + round_, listed
            body = b"\r\n".join(c.multi(f"RETR {len(listed)}"))
            assert f"Subject: lmtp {round_}".encode() in body
            c.cmd("QUIT")
            c.close()
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                assert b"fastpop_connections_total" in r.read()
            problems = _late_problems(srv, late)
            assert not problems, problems

        every_way_in(1)
        _give(keys, nobody)  # a reload checks the configuration again, as nobody
        os.kill(srv.proc.pid, signal.SIGHUP)  # the reload: configuration, passwd-file, certificate
        deadline = time.monotonic() + 10
        while srv.log().count("SIGHUP: configuration") < workers:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        every_way_in(2)
    finally:
        rc = srv.stop()
    problems = _late_problems(srv, late)
    assert not problems, problems
    assert rc == 0, srv.log()


@pytest.mark.parametrize("driver", ["sqlite", "postgresql", "mysql", "ldap", "ldap-bind"])
def test_user_databases_work_from_an_installation_the_user_cannot_read(world_reachable_dir, unreadable_install,
                                                                        driver):
    """The same for each user database driver, against a real server: its
    client library loaded, and nothing of root's (asyncpg looks for client
    certificates and passwords in $HOME) read after the switch of user."""
    import sqlite3

    from support.userdb_servers import PASSWORD_QUERY, USERS_TABLE, MariaDBServer, PostgresServer, SlapdServer, ssha

    private, late = unreadable_install
    nobody = pwd.getpwnam("nobody")
    root = world_reachable_dir
    kinds = {"postgresql": PostgresServer, "mysql": MariaDBServer, "ldap": SlapdServer, "ldap-bind": SlapdServer}
    db = None
    if driver in kinds:
        why = kinds[driver].available()
        if why:
            pytest.skip(why)
        db = kinds[driver]()
    try:
        if driver == "sqlite":
            path = root / "users.sqlite"
            with sqlite3.connect(path) as conn:
                conn.execute(USERS_TABLE)
                conn.execute("INSERT INTO users (userid, password) VALUES ('dbuser', ?)", (ssha("db pw"),))
            toml = f'[userdb]\ndriver = "sqlite"\nconnect = "{path}"\npassword_query = "{PASSWORD_QUERY}"\n'
        elif driver.startswith("ldap"):
            assert isinstance(db, SlapdServer)
            db.add_user("dbuser", "db pw", mail=None, stored=None, attributes={})
            bind = driver == "ldap-bind"  # StartTLS and a bind as the user; else ldaps:// and the hash fetched
            toml = f"""[userdb]
driver = "ldap"
[ldap]
uri = "{db.uri if bind else db.ldaps_uri}"
starttls = {'true' if bind else 'false'}
tls_ca_file = "{db.ca_file}"
bind_dn = "{db.SEARCH_DN}"
bind_password = "{db.SEARCH_PW}"
base = "{db.PEOPLE}"
filter = "(&(objectClass=posixAccount)(uid=%u))"
auth_bind = {'true' if bind else 'false'}
attrs = ["home=homeDirectory"]
"""
        else:
            assert isinstance(db, PostgresServer | MariaDBServer)
            db.add_users([{"userid": "dbuser", "password": ssha("db pw")}])
            toml = f'[userdb]\ndriver = "{driver}"\nconnect = "{db.dsn}"\npassword_query = "{PASSWORD_QUERY}"\n'
        (root / "fastpop.toml").write_text(toml)
        srv = ServerProcess(root, "cython", extra_args=["--config", str(root / "fastpop.toml"), "--user", "nobody",
                                                        "--auth-secret-file", str(private / "auth.key")])
        for sub in ("cur", "new", "tmp"):
            (srv.mail / "dbuser" / sub).mkdir(parents=True)
        (srv.mail / "dbuser" / "new" / "1.M1.test").write_bytes(message("from the database"))
        _give(srv.mail, nobody)
        srv.start()
        try:
            assert _served_from(srv.proc.pid, private)
            for password, reply in (("db pw", b"+OK"), ("wrong", b"-ERR [AUTH]")):
                p = srv.connect()
                p.user("dbuser")
                try:
                    got = p.pass_(password)
                except Exception as exc:  # poplib raises on -ERR
                    got = exc.args[0]
                assert got.startswith(reply), (password, got, srv.log()[-2000:])
                if reply == b"+OK":
                    assert p.stat()[0] == 1
                p.quit()
            problems = _late_problems(srv, late)
            assert not problems, problems
        finally:
            rc = srv.stop()
        problems = _late_problems(srv, late)
        assert not problems, problems
        assert rc == 0, srv.log()
    finally:
        if db is not None:
            db.close()
