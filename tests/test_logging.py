"""Log formats (``--log-format``, ``[server] log_format``): every line of a
real server's log parses, and the session line carries stable fields."""

from __future__ import annotations

import json
import logging
import poplib
import re

import pytest
from support.server import ServerProcess, message

from fastpop.serve.validation import validate_all

# the fields every structured line has, and those of the per-session line
COMMON = {"ts", "level", "logger", "pid"}
SESSION = {"event": "session", "user": str, "rip": "127.0.0.1", "top": int, "top_bytes": int, "retr": int,
           "retr_bytes": int, "del": int, "del_bytes": int, "size": int, "end": str}
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
KEYVALUE = re.compile(r'([A-Za-z_]\w*)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)(?: |$)')


def parse_keyvalue(line: str) -> dict:
    out = {}
    pos = 0
    for m in KEYVALUE.finditer(line):
        assert m.start() == pos, f"not key=value at {pos}: {line!r}"
        pos = m.end()
        raw = m.group(2)
        out[m.group(1)] = json.loads(raw) if raw.startswith('"') else raw
    assert pos == len(line), line
    return out


def run_sessions(tmp_path, fmt: str) -> tuple[ServerProcess, str, list[str]]:
    srv = ServerProcess(tmp_path, "cython", extra_args=["--log-format", fmt])
    srv.start()
    try:
        user = srv.add_user([message("a", size=500), message("b")])
        p = user.login()
        p.retr(1)
        p.top(2, 0)
        p.dele(2)
        p.quit()
        p = srv.connect()
        p.user(user.name)
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong password")
        p.quit()
    finally:
        assert srv.stop() == 0
    return srv, user.name, [line for line in srv.log().splitlines() if line]


def check_session(fields: dict, name: str) -> None:
    for key, want in SESSION.items():
        assert key in fields, (key, fields)
        if isinstance(want, type):
            assert isinstance(fields[key], want), (key, fields)
        else:
            assert fields[key] == want, (key, fields)
    assert fields["user"] == name
    assert fields["retr"] == 1 and fields["retr_bytes"] > 500
    assert fields["top"] == 1
    assert fields["del"] == 1 and fields["end"] == "quit"


def test_json_lines(tmp_path):
    srv, name, lines = run_sessions(tmp_path, "json")
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for rec in records:
        assert COMMON <= rec.keys(), rec
        assert TS.fullmatch(rec["ts"]) and rec["level"] in ("debug", "info", "warning", "error")
        assert "event" in rec or "msg" in rec
    sessions = [r for r in records if r.get("event") == "session"]
    assert len(sessions) == 1
    check_session(sessions[0], name)
    assert isinstance(sessions[0]["top"], int) and sessions[0]["pid"] == srv_pid(records)
    failed = [r for r in records if r.get("event") == "auth failed"]
    assert failed and failed[0]["user"] == name and failed[0]["reason"] == "wrong password or unknown user"
    assert any("listening on 127.0.0.1:" in r.get("msg", "") for r in records)
    assert any(r.get("msg") == "stopped" for r in records)


def srv_pid(records: list[dict]) -> int:
    start = next(r for r in records if "listening on" in r.get("msg", ""))
    return start["pid"]


def test_keyvalue_lines(tmp_path):
    srv, name, lines = run_sessions(tmp_path, "keyvalue")
    records = [parse_keyvalue(line) for line in lines]
    for rec in records:
        assert COMMON <= rec.keys(), rec
    session = [r for r in records if r.get("event") == "session"]
    assert len(session) == 1
    fields = {k: int(v) if isinstance(v, str) and v.isdigit() and k not in ("user", "rip") else v
              for k, v in session[0].items()}
    check_session(fields, name)
    failed = [r for r in records if r.get("event") == "auth failed"]
    assert failed[0]["reason"] == "wrong password or unknown user"  # quoted: it has spaces


def test_text_stays_as_it_was(tmp_path):
    srv, name, lines = run_sessions(tmp_path, "text")
    assert any(re.search(rf"INFO fastpop.session: session user={name} rip=127\.0\.0\.1 top=1/\d+ retr=1/\d+ "
                         r"del=1/\d+ size=\d+ end=quit$", line) for line in lines), lines


def test_workers_log_json_too(tmp_path):
    srv = ServerProcess(tmp_path, "cython", extra_args=["--log-format", "json", "--workers", "2"])
    srv.start()
    try:
        user = srv.add_user([message("a")])
        p = user.login()
        p.quit()
    finally:
        assert srv.stop() == 0
    records = [json.loads(line) for line in srv.log().splitlines() if line]
    assert {r["logger"] for r in records} >= {"fastpop.workers", "fastpop.session", "fastpop"}
    assert len({r["pid"] for r in records}) >= 3  # the supervisor and two workers


def test_formatter_units():
    from fastpop.serve.logformat import JSONFormatter, KeyValueFormatter

    def record(msg, *args, exc=None):
        return logging.LogRecord("fastpop.x", logging.WARNING, __file__, 1, msg, args, exc)

    j = json.loads(JSONFormatter().format(record("refused rip=%s: %d connections open from it", "192.0.2.1", 7)))
    assert j["event"] == "refused" and j["rip"] == "192.0.2.1"
    assert j["msg"] == "refused rip=192.0.2.1: 7 connections open from it"  # not only pairs: the text stays
    j = json.loads(JSONFormatter().format(record("odd level=%s msg=%d", "x", 3)))
    assert j["level"] == "warning" and j["level_"] == "x" and j["msg_"] == 3  # no clobbered common fields
    j = json.loads(JSONFormatter().format(record("100%% of %s", "it")))
    assert j["msg"] == "100% of it" and "event" not in j
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        j = json.loads(JSONFormatter().format(record("failed user=%s", "a", exc=sys.exc_info())))
    assert j["event"] == "failed" and "RuntimeError: boom" in j["exc"]
    kv = KeyValueFormatter().format(record('auth failed user=%s reason=%s', 'a"b', "x y=z"))
    assert parse_keyvalue(kv)["user"] == 'a"b' and parse_keyvalue(kv)["reason"] == "x y=z"


def test_config(tmp_path):
    from fastpop.config import load_toml

    path = tmp_path / "f.toml"
    path.write_text('[server]\nlog_format = "json"\n')
    config = load_toml(str(path))
    assert config.log_format == "json"
    config.passwd_file = str(path)
    validate_all(config)
    config.log_format = "xml"
    with pytest.raises(ValueError, match="log_format"):
        validate_all(config)


def test_a_server_logs_every_session_once_under_concurrent_load(tmp_path):
    import concurrent.futures

    srv = ServerProcess(tmp_path, "cython")
    srv.start()
    try:
        users = [srv.add_user([message("m")], name=f"batch{n}") for n in range(40)]

        def session(user) -> None:
            box = poplib.POP3("127.0.0.1", srv.port, timeout=10)
            box.user(user.name)
            box.pass_(user.password)
            box.stat()
            box.quit()

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            for _ in range(3):
                list(pool.map(session, users))
    finally:
        srv.stop()
    lines = [line for line in srv.log().splitlines() if " session user=" in line]
    assert sorted(line.split("session user=")[1].split()[0] for line in lines) == sorted(
        u.name for u in users for _ in range(3))


@pytest.fixture
def root_logging():
    """configure_logging changes the root logger: put it back afterwards."""
    from fastpop import logline

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logline.use(None)


def test_the_direct_session_line_is_the_logging_modules_line(root_logging):
    """fastpop.logline.info writes the text format's line itself (no
    LogRecord, no Formatter): it must be the very line Logger.info writes."""
    import io

    from fastpop import logline
    from fastpop.serve.logformat import configure_logging

    out = io.StringIO()
    configure_logging("text", "info", out)
    log = logging.getLogger("fastpop.session")
    args = ("alice@example.org", "192.0.2.1", 1, 2, 3, 4, 5, 6, 7, "quit")
    fmt = "session user=%s rip=%s top=%d/%d retr=%d/%d del=%d/%d size=%d end=%s"
    logline.info(log, fmt, args)
    log.info(fmt, *args)
    direct, logged = out.getvalue().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    assert stamp.match(direct) and stamp.match(logged), (direct, logged)
    assert direct[24:] == logged[24:] == "INFO fastpop.session: " + fmt % args
    # the time stamp is logging's own asctime, to the millisecond, whatever the fraction
    formatter = logging.Formatter()
    for created in (1700000000.0, 1700000000.0005, 1700000000.999, 1700000001.5):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert logline.stamp(created) == formatter.formatTime(record)


def test_the_direct_path_steps_aside_for_other_handlers_formats_and_levels(root_logging):
    """A capturing handler, a filter, the structured formats or a level above
    INFO: the line goes through Logger.info, as every other line does."""
    import io

    from fastpop import logline
    from fastpop.serve.logformat import configure_logging

    log = logging.getLogger("fastpop.session")
    out = io.StringIO()
    configure_logging("text", "info", out)
    captured: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record)

    extra = Capture()
    logging.getLogger().addHandler(extra)
    logline.info(log, "session user=%s end=%s", ("a", "quit"))
    assert [r.getMessage() for r in captured] == ["session user=a end=quit"]  # both handlers had it
    assert out.getvalue().endswith("INFO fastpop.session: session user=a end=quit\n")
    logging.getLogger().removeHandler(extra)
    log.addFilter(lambda record: False)
    try:
        logline.info(log, "session user=%s end=%s", ("b", "quit"))
    finally:
        log.filters.clear()
    assert "user=b" not in out.getvalue()  # the filter was obeyed
    configure_logging("json", "info", out)
    logline.info(log, "session user=%s end=%s", ("c", "quit"))
    assert json.loads(out.getvalue().splitlines()[-1])["user"] == "c"
    configure_logging("text", "warning", out)
    logline.info(log, "session user=%s end=%s", ("d", "quit"))
    assert "user=d" not in out.getvalue()
