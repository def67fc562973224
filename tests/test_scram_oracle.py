"""Issue 17 item 2: SCRAM-SHA-256 must not tell existing users from unknown ones.

The server-first message (RFC 5802) of an unknown user carries a salt made up
from the server's persistent secret (``[auth] secret_file``): as long as the
salt ``fastpop user add`` stores, with the same iteration count, the same in
every worker, after a SIGHUP and after a restart.  It goes out no sooner than
``SCRAM_FIRST_FLOOR`` after the lookup starts, whatever the user, and the
failure penalty is waited out before the lookup.  The secret file is refused
unless it is a regular file of the server's user that nobody else may read.
Against a real fastpop over TCP; scramp plays the client."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from scramp import ScramClient
from support.server import AS_ROOT, PARSERS, ServerProcess
from support.tls import Conn, b64, stop_clean, unb64, wait_for_log

from fastpop.auth import sasl

PENALTY = 0.4  # --auth-penalty-initial and -max
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
CANCELLED = b"-ERR [AUTH] Authentication cancelled.\r\n"
UNKNOWN = "nobody-here"

_sources = iter(range(10, 250))


def source() -> str:
    """A loopback address no earlier attempt was counted against (127.0.0.1 is trusted)."""
    return f"127.0.18.{next(_sources)}"


def server_first(c: Conn, name: str, password: str = "x") -> tuple[dict[str, str], ScramClient]:
    """Send a client-first for ``name``; the server-first's fields (r, s, i)."""
    client = ScramClient(["SCRAM-SHA-256"], name, password)
    line = c.cmd("AUTH SCRAM-SHA-256 " + b64(client.get_client_first()))
    text = unb64(line).decode()
    client.set_server_first(text)
    return dict(kv.split("=", 1) for kv in text.split(",")), client


def probe(port: int, name: str, src: str | None = None) -> dict[str, str]:
    """The server-first for ``name``, then cancel (no failure counted)."""
    c = Conn(port, source=src)
    fields, _ = server_first(c, name)
    assert c.cmd("*") == CANCELLED
    c.close()
    return fields


def salt_of(fields: dict[str, str]) -> bytes:
    return base64.b64decode(fields["s"])


def user_add(srv: ServerProcess, name: str, password: str) -> None:
    """A user made by ``fastpop user add`` itself (hash plus SCRAM keys)."""
    subprocess.run([sys.executable, "-m", "fastpop", "user", "add", name, "--passwd-file", str(srv.passwd),
                    "--scheme", "SSHA256"], input=password + "\n", text=True, check=True, timeout=30)


def secret_args(path) -> list[str]:
    return ["--auth-secret-file", str(path)]


@pytest.fixture(scope="module", params=list(PARSERS), ids=list(PARSERS))
def server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fastpop-scram-oracle")
    srv = ServerProcess(root, PARSERS[request.param], extra_args=[
        *secret_args(root / "auth.key"), "--trusted-networks", "127.0.0.1/32",
        "--auth-penalty-initial", str(PENALTY), "--auth-penalty-max", str(PENALTY),
        "--max-connections-per-ip", "0", "--log-level", "info",
    ])
    srv.start()
    yield srv
    stop_clean(srv)


# ----------------------------------------------------------------- (a) the same shape


def test_unknown_user_server_first_has_a_real_salt_length_and_iterations(server):
    """Before: unknown users got a 16-byte salt, `fastpop user add` stores 32."""
    user_add(server, "stored-keys", "stored pw")
    clear = server.add_user(password="clear pw")  # {PLAIN}: keys derived
    hashed = server.add_user(stored="{SSHA256}" + base64.b64encode(b"x" * 40).decode())  # no keys at all
    shapes = {name: probe(server.port, name) for name in ("stored-keys", clear.name, hashed.name, UNKNOWN)}
    real = shapes["stored-keys"]
    assert (len(salt_of(real)), real["i"]) == (32, "4096"), real
    for name, fields in shapes.items():
        assert set(fields) == {"r", "s", "i"}, (name, fields)
        assert len(salt_of(fields)) == len(salt_of(real)), (name, shapes)
        assert fields["i"] == real["i"], (name, shapes)
    assert (sasl.SCRAM_SALT_BYTES, sasl.SCRAM_ITERATIONS) == (32, 4096)
    # each made-up salt is the same every time, and differs from name to name
    assert probe(server.port, UNKNOWN)["s"] == shapes[UNKNOWN]["s"]
    assert probe(server.port, hashed.name)["s"] == shapes[hashed.name]["s"]
    assert probe(server.port, clear.name)["s"] == shapes[clear.name]["s"]
    assert len({f["s"] for f in shapes.values()}) == len(shapes)
    # and the real users still log in
    c = Conn(server.port)
    _, client = server_first(c, "stored-keys", "stored pw")
    line = c.cmd(b64(client.get_client_final()))
    client.set_server_final(unb64(line).decode())


# ----------------------------------------------------------------- (c) the penalty first


def test_penalised_address_waits_before_the_server_first(server):
    """Before: the lookup and the server-first came at once; the penalty only
    at the proof, so a penalised guesser still enumerated at full speed."""
    victim = server.add_user(password="right")
    src = source()
    c = Conn(server.port, source=src)
    _, client = server_first(c, victim.name, "wrong")
    assert c.cmd(b64(client.get_client_final())) == AUTH_FAILED  # one failure: the address is penalised
    c.close()
    for name in (UNKNOWN, victim.name):
        c = Conn(server.port, source=src)
        started = time.monotonic()
        server_first(c, name)
        waited = time.monotonic() - started
        assert waited >= PENALTY * 0.95, (name, waited)
        assert c.cmd("*") == CANCELLED
        c.close()
    # the user's own count too: from a fresh address, the victim's name waits
    c = Conn(server.port, source=source())
    started = time.monotonic()
    server_first(c, victim.name)
    assert time.monotonic() - started >= PENALTY * 0.95


# ----------------------------------------------------------------- (d) the floor


def test_server_first_is_never_sooner_than_the_floor(server):
    """Before: an unknown user's server-first came back in well under a
    millisecond, a {PLAIN} user's after a key derivation.  Now none comes
    before the floor (a lower bound: it holds however slow the host is)."""
    clear = server.add_user(password="floor pw")
    user_add(server, "floor-keys", "floor pw")
    for name in (UNKNOWN, clear.name, "floor-keys", clear.name):  # the last: keys remembered
        c = Conn(server.port)
        started = time.monotonic()
        server_first(c, name)
        waited = time.monotonic() - started
        # (uvloop's timers have millisecond steps: a little slack)
        assert waited >= sasl.SCRAM_FIRST_FLOOR * 0.9, (name, waited)
        c.close()


# ----------------------------------------------------------------- (b) stable salts


def test_made_up_salt_survives_sighup_and_restart(tmp_path):
    """Before: the secret was random per process, made again on SIGHUP."""
    key = tmp_path / "auth.key"
    srv = ServerProcess(tmp_path, "cython", extra_args=secret_args(key))
    clear = srv.add_user(password="clear pw")
    srv.start()
    try:
        before = {name: probe(srv.port, name)["s"] for name in (UNKNOWN, clear.name)}
        os.kill(srv.proc.pid, signal.SIGHUP)
        wait_for_log(srv, r"SIGHUP: configuration")
        assert {name: probe(srv.port, name)["s"] for name in before} == before
    finally:
        stop_clean(srv)
    st = key.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
    assert re.fullmatch(rb"[0-9a-f]{64}\n", key.read_bytes())
    srv.start()
    try:
        assert {name: probe(srv.port, name)["s"] for name in before} == before
    finally:
        stop_clean(srv)
    # another secret, other salts
    other = ServerProcess(tmp_path / "other", "cython", extra_args=secret_args(tmp_path / "other.key"))
    other.start()
    try:
        assert probe(other.port, UNKNOWN)["s"] != before[UNKNOWN]
    finally:
        stop_clean(other)


def _salts_per_worker(srv: ServerProcess, name: str) -> dict[str, str]:
    """``name``'s salt from two workers: connect until a second one answers
    (the greeting's APOP timestamp names the pid)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 8
    while len(seen) < 2 and time.monotonic() < deadline:
        c = Conn(srv.port)
        pid = re.search(rb"<(\d+)\.", c.greeting).group(1).decode()
        if pid not in seen:
            seen[pid] = server_first(c, name)[0]["s"]
        c.close()
    assert len(seen) == 2, f"the kernel gave every connection to one worker: {seen}"
    return seen


def test_made_up_salt_is_the_same_in_every_worker(tmp_path):
    """Before: each worker made its own secret, so a name's salt changed with
    the worker a connection reached."""
    srv = ServerProcess(tmp_path, "cython",
                        extra_args=[*secret_args(tmp_path / "auth.key"), "--workers", "2", "--apop"])
    srv.start()
    try:
        seen = _salts_per_worker(srv, UNKNOWN)
        assert len(set(seen.values())) == 1, seen
    finally:
        stop_clean(srv)


def test_default_secret_file_in_the_state_directory(tmp_path, monkeypatch):
    """Without [auth] secret_file: systemd's $STATE_DIRECTORY/auth.key, made
    0600; the salt the same after a restart."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    srv = ServerProcess(tmp_path / "srv", "cython")
    srv.start()
    try:
        first = probe(srv.port, UNKNOWN)["s"]
    finally:
        stop_clean(srv)
    assert (state / "auth.key").stat().st_mode & 0o777 == 0o600
    srv.start()
    try:
        assert probe(srv.port, UNKNOWN)["s"] == first
    finally:
        stop_clean(srv)


def test_default_location_unusable_falls_back_to_one_secret_for_all_workers(tmp_path, monkeypatch):
    """A default location that cannot be made: a warning that says what is
    lost and which setting to use, and still one secret for every worker
    (made by the supervisor before forking)."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "a-file" / "state"))
    srv = ServerProcess(tmp_path / "srv", "cython", extra_args=["--workers", "2", "--apop"])
    srv.start()
    try:
        assert re.search(r"WARNING.*cannot keep a secret in .*a-file/state/auth\.key.*secret_file", srv.log())
        seen = _salts_per_worker(srv, UNKNOWN)
        assert len(set(seen.values())) == 1, seen
    finally:
        stop_clean(srv)


# ----------------------------------------------------------------- (e) the secret file refused


def _refused(tmp_path, key, env=None) -> str:
    """Start fastpop with ``key`` as the secret file; it must exit, not serve: its output."""
    (tmp_path / "passwd").touch()
    args = [sys.executable, "-m", "fastpop", "serve", "--listen", "127.0.0.1:0", "--passwd-file",
            str(tmp_path / "passwd"), "--mail-location", str(tmp_path) + "/%u", "--workers", "1", *AS_ROOT]
    if key is not None:
        args += secret_args(key)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"fastpop served with secret file {key}:\n{out}")
    assert proc.returncode != 0, out
    assert "listening on" not in out, out
    return out


def _group_readable(path):
    path.write_text("a" * 64 + "\n")
    path.chmod(0o640)


def _world_readable(path):
    path.write_text("a" * 64 + "\n")
    path.chmod(0o604)


def _symlink(path):
    real = path.parent / "real.key"
    real.write_text("a" * 64 + "\n")
    real.chmod(0o600)
    path.symlink_to(real)


def _directory(path):
    path.mkdir(mode=0o700)


def _fifo(path):
    os.mkfifo(path, 0o600)


def _short(path):
    path.write_text("too short\n")
    path.chmod(0o600)


def _not_ours(path):
    path.write_text("a" * 64 + "\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)


REFUSALS = {
    "group-readable": (_group_readable, "mode 0640"),
    "world-readable": (_world_readable, "mode 0604"),
    "symlink": (_symlink, "symbolic link"),
    "directory": (_directory, "not a regular file"),
    "fifo": (_fifo, "not a regular file"),
    "short": (_short, "fewer than 32"),
    "someone else's": (_not_ours, "must belong to uid"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_unsafe_secret_file_is_refused(tmp_path, kind):
    make, why = REFUSALS[kind]
    if kind == "someone else's" and os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    key = tmp_path / "auth.key"
    make(key)
    out = _refused(tmp_path, key)
    assert str(key) in out and why in out, out


def test_unsafe_default_secret_file_is_refused_not_replaced(tmp_path):
    """The default location is no excuse: a readable file there stops the
    start (and is left as it is) rather than being bypassed."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    _group_readable(state / "auth.key")
    out = _refused(tmp_path, None, env={"STATE_DIRECTORY": str(state)})
    assert "mode 0640" in out, out
    assert (state / "auth.key").read_text() == "a" * 64 + "\n"


def test_configured_secret_file_that_cannot_be_made_stops_the_start(tmp_path):
    out = _refused(tmp_path, tmp_path / "no-such-dir" / "auth.key")
    assert "secret_file" in out and "no-such-dir" in out, out
