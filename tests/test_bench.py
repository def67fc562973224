"""fastpop bench: against a spawned fastpop, a spawned Dovecot, and a lying server.

Every run is a real ``fastpop bench`` process (and its client processes)
against a real server on 127.0.0.1, for a second or two of load.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastpop.bench import client as C
from fastpop.bench import dovecot, report, spawn

BENCH = [sys.executable, "-m", "fastpop", "bench"]
SMALL = ["--mailboxes", "12", "--messages", "4", "-p", "2", "-c", "4", "-w", "0.2", "-q"]


def bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout)


def run_json(tmp_path: Path, *args: str, expect_rc: int = 0) -> dict:
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.json')))}.json"
    proc = bench(*args, "--json", str(out))
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert report.validate(result) == [], report.validate(result)
    return result


@pytest.fixture
def trivial():
    """The canned responder; yields a function making it corrupt every n-th RETR."""
    procs = []

    def start(corrupt: int = 0, messages: int = 5) -> int:
        proc = subprocess.Popen(
            [*BENCH, "trivial-server", "--corrupt", str(corrupt), "--messages", str(messages)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        procs.append(proc)
        m = re.search(r":(\d+) \(pid", proc.stderr.readline())
        assert m, "trivial server did not start"
        return int(m.group(1))

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.fixture
def users_file(tmp_path) -> Path:
    path = tmp_path / "users"
    path.write_text("".join(f"u{i} p{i}\n" for i in range(16)))
    return path


# ------------------------------------------------------------------ against fastpop


def test_spawned_stat_reports_everything(tmp_path):
    r = run_json(tmp_path, "--spawn", "-s", "stat", "-d", "1.5", *SMALL)
    assert r["ok"] and r["errors"]["total"] == 0
    assert r["target"]["spawned"] and "parser: cython" in r["target"]["server"]
    assert r["totals"]["sessions"] > 20 and r["rates"]["sessions_per_s"] > 10
    for label in ("connect", "greeting", "USER", "PASS", "STAT", "QUIT", "session"):
        lat = r["latency_us"][label]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    server = r["server"]
    assert server["pid"] > 0 and server["processes"] == 1
    assert server["cpu_seconds"] > 0 and server["cpu_s_per_1000_sessions"] > 0
    assert server["peak_rss_bytes"] > 1024 * 1024
    assert r["load"] == {**r["load"], "model": "closed", "connections": 4, "procs": 2, "loop": "uvloop"}
    assert r["timeline"] and r["timeline"][0]["second"] == 1


def test_spawned_download_verifies_every_message(tmp_path):
    r = run_json(tmp_path, "--spawn", "-s", "download", "-d", "1.5", *SMALL)
    assert r["ok"]
    t = r["totals"]
    assert t["messages"] >= 4 * t["sessions"] > 0
    assert t["unverified"] == 0
    assert t["octets"] > 3000 * t["messages"]
    assert r["latency_us"]["RETR"]["count"] >= t["messages"]
    assert r["rates"]["mb_per_s"] > 0


def test_spawned_download_delete_reseeds(tmp_path):
    work = tmp_path / "work"
    r = run_json(tmp_path, "--spawn", "-s", "download-delete", "-d", "1", "--workdir", str(work), *SMALL)
    assert r["ok"], r["errors"]
    assert r["latency_us"]["DELE"]["count"] > 0
    # mail was deleted and put back: every mailbox still holds its 4 messages
    for maildir in (work / "mail").iterdir():
        files = list((maildir / "cur").iterdir()) + list((maildir / "new").iterdir())
        assert len(files) == 4, maildir


def test_spawned_mixed_and_retr_large(tmp_path):
    r = run_json(tmp_path, "--spawn", "-s", "mixed", "--mix", "stat=1,retr-large=1", "--large-size", "300k",
                 "-d", "1.5", *SMALL)
    assert r["ok"] and r["mix"] == {"stat": 1.0, "retr-large": 1.0}
    assert r["latency_us"]["LIST"]["count"] > 0 and r["latency_us"]["STAT"]["count"] > 0
    assert r["totals"]["octets"] >= 300 * 1024


def test_spawned_idle_reports_memory_per_session(tmp_path):
    r = run_json(tmp_path, "--spawn", "-s", "idle", "-c", "60", "-d", "1", "--idle-noop", "0.4",
                 "--mailboxes", "60", "--messages", "2", "-p", "2", "-w", "0", "-q")
    assert r["ok"], r["errors"]
    assert r["totals"]["opened"] == 60
    assert r["server"]["idle_sessions"] == 60
    assert r["server"]["rss_per_session_bytes"] > 0
    assert r["latency_us"]["NOOP"]["count"] >= 60


def test_sessions_mode_runs_exactly_n(tmp_path):
    r = run_json(tmp_path, "--spawn", "-s", "login", "-n", "40", "--mailboxes", "8", "-c", "4", "-p", "2", "-w", "0",
                 "-q")
    assert r["totals"]["sessions"] == 40 and r["load"]["duration"] is None


def test_bad_password_is_a_clear_setup_error(tmp_path):
    seeded = spawn.seed(tmp_path, spawn.SeedSpec(mailboxes=2, messages=1))
    users = tmp_path / "wrong"
    users.write_text("bench0001 not-the-password\n")
    with spawn.SpawnedServer(seeded) as server:
        started = time.monotonic()
        proc = bench(server.address, "--users", str(users), "-d", "1", "-q")
    assert proc.returncode == 2
    assert "login as 'bench0001' failed" in proc.stderr
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("flags, capability, message", [
    (["--tls", "starttls"], "STLS", "does not offer STLS"),
    (["--tls", "implicit"], None, "implicit TLS to"),
    (["--auth", "plain"], "SASL", "does not offer AUTH PLAIN"),
])
def test_tls_and_auth_plain_against_fastpop_work_or_fail_clearly(tmp_path, flags, capability, message):
    """A feature fastpop offers is used; one it lacks is a clear message, not a hang."""
    import poplib

    seeded = spawn.seed(tmp_path, spawn.SeedSpec(mailboxes=2, messages=1))
    with spawn.SpawnedServer(seeded) as server:
        pop = poplib.POP3("127.0.0.1", server.port, timeout=10)
        capa = pop.capa()
        pop.quit()
        offered = capability is not None and (
            capability in capa and (capability != "SASL" or "PLAIN" in " ".join(capa["SASL"]).upper().split())
        )
        started = time.monotonic()
        proc = bench(server.address, "--users", str(seeded.users_file), "-c", "2", "-p", "1", "-d", "1", "-w", "0",
                     "-q", *flags, timeout=30)
    if offered:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert message in proc.stderr
        assert time.monotonic() - started < 15  # a message, not a hang


def test_spawn_refuses_tls():
    proc = bench("--spawn", "--tls", "starttls", "-q")
    assert proc.returncode == 2 and "certificate" in proc.stderr


# ------------------------------------------------------------------ integrity, rate, output


def test_corrupted_message_is_an_integrity_error(tmp_path, trivial, users_file):
    port = trivial(corrupt=3)
    proc = bench(f"127.0.0.1:{port}", "--users", str(users_file), "-s", "download", "-d", "1", "-w", "0",
                 "-c", "2", "-p", "1", "-q", "--json", str(tmp_path / "bad.json"))
    assert proc.returncode == 1
    assert "ERRORS" in proc.stdout and "integrity" in proc.stdout
    r = json.loads((tmp_path / "bad.json").read_text())
    assert not r["ok"]
    errors = r["errors"]
    assert errors["by_kind"]["integrity"] > 0 and set(errors["by_kind"]) == {"integrity"}
    assert "SHA-256" in errors["samples"]["integrity"][0]


def test_honest_trivial_server_gives_no_errors(tmp_path, trivial, users_file):
    port = trivial(corrupt=0)
    r = run_json(tmp_path, f"127.0.0.1:{port}", "--users", str(users_file), "-s", "download", "-d", "1", "-w", "0",
                 "-c", "2", "-p", "1", "-q")
    assert r["ok"] and r["totals"]["unverified"] == 0 and r["totals"]["messages"] > 0


def test_open_loop_rate_is_accurate(tmp_path, trivial, users_file):
    port = trivial()
    r = run_json(tmp_path, f"127.0.0.1:{port}", "--users", str(users_file), "-s", "stat", "--rate", "250",
                 "-d", "2", "-w", "0.5", "-p", "2", "-q")
    assert r["load"]["model"] == "open" and r["load"]["rate"] == 250
    assert r["totals"]["backlog"] == 0
    assert abs(r["rates"]["started_per_s"] - 250) / 250 < 0.05, r["rates"]
    assert abs(r["totals"]["started"] - 500) <= 25


def test_json_schema_catches_bad_results():
    assert report.validate({"schema": "x"})  # many problems
    good_lat = {"count": 1, "avg": 1.0, "p50": 1, "p90": 1, "p99": 1, "p99.9": 1, "max": 1, "hdr": "x"}
    assert report.validate(good_lat, report.RESULT_SCHEMA["properties"]["latency_us"]["additionalProperties"]) == []
    bad = dict(good_lat, p99="slow")
    assert report.validate(bad, report.RESULT_SCHEMA["properties"]["latency_us"]["additionalProperties"])


def test_compare_and_plot(tmp_path):
    a = run_json(tmp_path, "--spawn", "-s", "stat", "-d", "1", *SMALL)
    b = run_json(tmp_path, "--spawn", "-s", "stat", "-d", "1", "--server-parser", "python", *SMALL)
    assert "parser: python" in b["target"]["server"]
    files = sorted(tmp_path.glob("r*.json"))
    proc = bench("compare", str(files[0]), str(files[1]), "--names", "cython,python")
    assert proc.returncode == 0, proc.stderr
    assert "sessions/s" in proc.stdout and "python / cython" in proc.stdout
    assert re.search(r"\d+\.\d\dx", proc.stdout)
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    report.plot(a, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ against Dovecot

_NO_DOVECOT = dovecot.unavailable()


@pytest.fixture(scope="module")
def dovecot_server(tmp_path_factory):
    if _NO_DOVECOT:
        pytest.skip(_NO_DOVECOT)
    root = spawn.make_workdir()  # in /tmp: Dovecot's users must be able to reach it
    try:
        seeded = spawn.seed(root, spawn.SeedSpec(mailboxes=12, messages=4))
        server = dovecot.DovecotServer(seeded, tls=True)
        server.start()
        yield server
        server.stop()
    finally:
        spawn.remove_workdir(root)


def test_dovecot_stat_and_download(tmp_path, dovecot_server):
    d = dovecot_server
    users = str(d.seeded.users_file)
    r = run_json(tmp_path, d.address, "--users", users, "-s", "stat", "-d", "1", "-c", "4", "-p", "2",
                 "-w", "0.2", "-q", "--server-pid", str(d.pid))
    assert r["ok"] and r["totals"]["sessions"] > 10
    assert r["server"]["processes"] > 3  # master, login, auth, mail processes: all counted
    assert r["server"]["cpu_s_per_1000_sessions"] > 0
    assert r["target"]["server"].startswith("Dovecot")
    r = run_json(tmp_path, d.address, "--users", users, "-s", "download", "-d", "1", "-c", "4", "-p", "2",
                 "-w", "0.2", "-q")
    assert r["ok"] and r["totals"]["messages"] > 0 and r["totals"]["unverified"] == 0


@pytest.mark.parametrize("tls, auth", [("starttls", "user"), ("starttls", "plain"), ("implicit", "plain")])
def test_dovecot_tls_and_auth_plain(tmp_path, dovecot_server, tls, auth):
    d = dovecot_server
    port = d.tls_port if tls == "implicit" else d.port
    r = run_json(tmp_path, f"127.0.0.1:{port}", "--users", str(d.seeded.users_file), "-s", "download",
                 "--tls", tls, "--auth", auth, "--cafile", str(d.cert),
                 "-d", "1", "-c", "2", "-p", "1", "-w", "0", "-q")
    assert r["ok"], r["errors"]
    assert r["target"]["tls"] == tls and r["target"]["auth"] == auth
    assert ("AUTH" if auth == "plain" else "PASS") in r["latency_us"]
    if tls == "starttls":
        assert r["latency_us"]["STLS"]["count"] > 0 and r["latency_us"]["TLS"]["count"] > 0


def test_dovecot_wrong_password_leaves_no_penalty(tmp_path, dovecot_server):
    d = dovecot_server
    wrong = tmp_path / "wrong"
    name = d.seeded.users[0][0]
    wrong.write_text(f"{name} nope\n")
    for _ in range(3):
        assert bench(d.address, "--users", str(wrong), "-q", timeout=30).returncode == 2
    # the auth penalty would now delay logins from 127.0.0.1 by seconds
    r = run_json(tmp_path, d.address, "--users", str(d.seeded.users_file), "-s", "login", "-n", "10", "-c", "2",
                 "-p", "1", "-w", "0", "-q")
    assert r["latency_us"]["PASS"]["max"] < 1_000_000, r["latency_us"]["PASS"]


def test_dovecot_proxy_in_front_of_fastpop(tmp_path):
    """benchmarks/proxy_relay.py --dovecot-proxy: Dovecot as a proxy only checks the
    password itself and relays every session to the fastpop backend behind it."""
    if _NO_DOVECOT:
        pytest.skip(_NO_DOVECOT)
    root = spawn.make_workdir()
    try:
        seeded = spawn.seed(root, spawn.SeedSpec(mailboxes=6, messages=3))
        with spawn.SpawnedServer(seeded) as backend, dovecot.DovecotProxy(seeded, backend.port) as proxy:
            r = run_json(tmp_path, proxy.address, "--users", str(seeded.users_file), "-s", "download", "-n", "12",
                         "-c", "2", "-p", "1", "-w", "0", "-q", "--server-pid", str(proxy.pid))
            assert r["ok"], r["errors"]
            assert r["totals"]["messages"] == 12 * 3 and r["totals"]["unverified"] == 0
            assert r["server"]["processes"] > 2  # master, pop3-login, auth...: the whole tree is counted
            assert "process_min_avail" in proxy.login_settings()
            assert proxy.log().count("Started proxying to <127.0.0.1>") >= 12
            assert backend.log().count("session user=") >= 12  # the sessions really ran on the backend
            name = seeded.users[0][0]
            wrong = tmp_path / "wrong"
            wrong.write_text(f"{name} nope\n")
            assert bench(proxy.address, "--users", str(wrong), "-n", "1", "-q", timeout=30).returncode == 2
            assert "auth failed" in proxy.log()
            assert "auth failed" not in backend.log()  # refused at the proxy, never forwarded
    finally:
        spawn.remove_workdir(root)


# ------------------------------------------------------------------ the client's framing


def _feed_in_pieces(data: bytes, size: int) -> tuple[C.MessageReader, int]:
    reader = C.MessageReader()
    for i in range(0, len(data), size):
        used = reader.feed(data[i : i + size])
        if used >= 0:
            return reader, i + used
    raise AssertionError("no terminator found")


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_message_reader_unstuffs_and_verifies_across_any_split(piece):
    msg = spawn.MessageFactory(3).message("u", 1, 5000)
    assert b"\r\n." in msg  # the body has lines starting with dots
    wire = msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    reader, end = _feed_in_pieces(wire + b"+OK next", piece)
    assert end == len(wire)
    assert reader.size == len(msg)
    assert reader.verify(len(msg)) is None
    assert reader.verify(len(msg) + 1) is not None  # a size that does not match the +OK line


def test_message_reader_detects_a_lost_stuffing_dot():
    msg = spawn.MessageFactory(3).message("u", 1, 5000)
    wire = msg + b".\r\n"  # a server that forgot to dot-stuff: clients drop the dots
    reader, _ = _feed_in_pieces(wire, 1000)
    assert "SHA-256" in reader.verify(-1) or "octets" in reader.verify(-1)


def test_message_reader_large_message_streams():
    msg = spawn.MessageFactory(5).message("u", 1, 3 * 1024 * 1024)
    wire = msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    reader, _ = _feed_in_pieces(wire, 65536)
    assert reader.verify(len(msg)) is None
    assert len(reader._acc) == 0


def test_size_distributions():
    import random

    rng = random.Random(1)
    assert spawn.SizeDistribution.parse("4k").sample(rng) == 4096
    u = spawn.SizeDistribution.parse("1000-2000")
    assert all(1000 <= u.sample(rng) <= 2000 for _ in range(100))
    ln = spawn.SizeDistribution.parse("lognormal:3700:0.8")
    sizes = sorted(ln.sample(rng) for _ in range(1001))
    assert 2500 < sizes[500] < 5500
    with pytest.raises(ValueError):
        spawn.SizeDistribution.parse("big")
    msg = spawn.MessageFactory(1).message("u", 1, 3700)
    assert abs(len(msg) - 3700) < 80 and msg.endswith(b"\r\n") and b"\n" not in msg.replace(b"\r\n", b"")


def test_two_spawned_servers_each_have_their_own_control_socket(tmp_path):
    """compare_dovecot --baseline runs two servers at once: as root both took the
    host's default control socket (/run/fastpop/control.sock), so `fastpop who`
    reached whichever bound it last."""
    seeded = spawn.seed(tmp_path, spawn.SeedSpec(mailboxes=2, messages=1))
    with spawn.SpawnedServer(seeded, name="a") as a, spawn.SpawnedServer(seeded, name="b") as b:
        for server in (a, b):
            socket_path = seeded.root / f"{server.name}.control.sock"
            who = subprocess.run([sys.executable, "-m", "fastpop", "who", "--socket", str(socket_path), "--json"],
                                 capture_output=True, text=True, timeout=30)
            assert who.returncode == 0, who.stderr
            assert json.loads(who.stdout)["ok"] is True
            assert f"control socket {socket_path}" in server.log()


def test_compare_dovecot_offers_every_server_the_same_rate(tmp_path):
    """``--rate``: an open loop at the same sessions/s for every server (a
    server's CPU per session depends on how busy it is, so servers driven each
    to its own saturation are not at the same point); the table says which load
    it was and marks a server that could not keep up.  (Dovecot left out:
    ``--no-dovecot``; tests/test_dovecot_side_by_side.py starts it.)  ``--login-floor``
    adds the uvloop responder making a login's system calls on the same Maildirs."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_dovecot.py"
    run = subprocess.run(
        [sys.executable, str(script), "--no-dovecot", "--login-floor", "--scenarios", "stat", "--rate", "stat=150",
         "--mailboxes", "6", "--messages", "2", "--duration", "1.5", "--warmup", "0.2", "--json-dir",
         str(tmp_path / "runs")], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "open loop at 150 sessions/s (stat)" in run.stdout, run.stdout[-2000:]
    runs = {p.name: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert sorted(runs) == ["stat-fastpop-1.json", "stat-login-floor-1.json", "stat-trivial-1.json"]
    assert "uvloop + a login's system calls" in run.stdout and "login floor / compiled" in run.stdout
    for result in runs.values():
        assert result["load"]["rate"] == 150 and result["errors"]["total"] == 0
        assert 120 <= result["rates"]["sessions_per_s"] <= 180, result["rates"]
    bad = subprocess.run([sys.executable, str(script), "--rate", "stat=fast"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--rate: not a rate: 'stat=fast'" in bad.stderr


@pytest.mark.parametrize("attack, size", [("index", ["--records", "20000"]), ("retr", ["--size-mb", "8"])])
def test_loop_stall_runs_each_attack(attack, size):
    """benchmarks/loop_stall.py, small: each round names what the attacker
    made the worker handle and how long the other user's NOOP waited."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_stall.py"
    run = subprocess.run([sys.executable, str(script), "--attack", attack, *size, "--rounds", "2"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rounds = re.findall(r"this tree  round (\d): (index of \d+ MiB|RETR of 8 MiB) in +\d+ ms; "
                        r"the other user's slowest NOOP +[\d.]+ ms", run.stdout)
    assert [r[0] for r in rounds] == ["1", "2"], run.stdout
