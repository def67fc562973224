"""The session's core, compiled (fastpop.session._core) and its pure-Python
twin (fastpop.session._core_py): one source, so the same methods, fields and
signatures; the same bytes, fields and log lines for the same sessions; and
hooks overridden in Python take effect with the compiled core.

The transcripts run in two fresh interpreters (each loads one core: the
session class is made at import), on copies of one Maildir tree, so that
UIDLs, sizes and every reply can be compared octet for octet; the other
tests are unit tests.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

CORE = "fastpop.session._core"
# beside the module that is imported: the source tree, or the installed wheel (which ships it)
PXD = Path(importlib.util.find_spec("fastpop.session").origin).parent / "_core.pxd"  # type: ignore[arg-type]
TIMESTAMP = "<1.2@fastpop.test>"  # the APOP greeting's, fixed so both runs send the same digest


def _pxd() -> tuple[set[str], set[str], set[str]]:
    """What _core.pxd declares of SessionCore: its fields, its cdef methods (C calls
    only, no attribute of the compiled class) and its cpdef methods."""
    fields, cdef, cpdef = set(), set(), set()
    for line in PXD.read_text().splitlines():
        words = line.split()
        if words[:2] == ["cdef", "public"]:
            fields.add(words[-1])
        elif words[:1] in (["cdef"], ["cpdef"]) and "(" in line:
            (cdef if words[0] == "cdef" else cpdef).add(line.split("(")[0].split()[-1])
    return fields, cdef, cpdef


def _members(cls: type) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("__")}


@pytest.mark.unit
def test_compiled_core_has_its_twins_methods_and_fields(twin_pair):
    compiled, python = twin_pair(CORE)
    c, p = _members(compiled.SessionCore), _members(python.SessionCore)
    _, c_only, cpdef = _pxd()
    assert c_only and c_only <= set(p), c_only - set(p)
    fields = set(python.SessionCore.__slots__)
    methods = set(p) - fields
    assert set(c) - fields == methods - c_only, "methods differ (other than the .pxd's cdef ones)"
    for name in sorted(methods - c_only - {"writing_paused"}):
        compiled_sig, python_sig = inspect.signature(c[name]), inspect.signature(p[name])  # type: ignore[arg-type]
        if name in cpdef:  # (a cpdef method's Python wrapper has no return annotation)
            compiled_sig, python_sig = compiled_sig.replace(return_annotation=None), python_sig.replace(
                return_annotation=None)
        assert compiled_sig == python_sig, name
    # every field public in the compiled class: the Python parts, subclasses and tests use them
    assert fields <= set(c), sorted(fields - set(c))


@pytest.mark.unit
def test_compiled_session_has_no_dict():
    from fastpop import _compiled
    from fastpop.session.protocol import POP3Protocol

    if _compiled.LOADED[CORE] != "cython":
        pytest.skip("the compiled core is not in use (FASTPOP_NO_EXTENSIONS)")
    session = POP3Protocol.__new__(POP3Protocol)
    assert type(session).__mro__[1].__module__ == CORE
    assert not hasattr(session, "__dict__")  # every part adds no field: the core's are typed C fields


def _hooked(base: type) -> type:
    """``base`` with Python overrides of the core's hooks, recording each call."""

    class HookedSession(base):
        __slots__ = ("calls",)

        def start_session(self) -> None:
            self.calls = [("start_session",)]
            super().start_session()

        def _unbusy(self, flag: int) -> None:
            self.calls.append(("_unbusy", flag))
            super()._unbusy(flag)

        def _on_logged_in(self) -> None:
            self.calls.append(("_on_logged_in",))

        def _on_login_refused(self, kind: str) -> None:
            self.calls.append(("_on_login_refused", kind))

        def _count_sent(self, is_top: bool, size: int) -> None:
            self.calls.append(("_count_sent", is_top, size))
            super()._count_sent(is_top, size)

    return HookedSession


@pytest.mark.unit
def test_python_overrides_of_the_hooks_run(tmp_path):
    from support.inprocess import Harness

    from fastpop.session.protocol import POP3Protocol
    from fastpop.session.state import BUSY_AUTH
    from fastpop.wire import responses as R

    h = Harness(tmp_path, auth_failure_delay=0.01)
    try:
        user = h.add_user(messages=[b"Subject: a\r\n\r\nhi\r\n"])
        s = h.connect(protocol=_hooked(POP3Protocol))
        s.send(f"USER {user.name}\r\nPASS wrong\r\n")
        s.expect(R.OK_USER + R.ERR_AUTH_FAILED)
        s.login(user)
        assert s.cmd("RETR 1").startswith(b"+OK")
        s.body()
        assert s.cmd("QUIT") == R.OK_LOGOUT
        assert s.protocol.calls == [
            ("start_session",),
            ("_on_login_refused", "credentials"), ("_unbusy", BUSY_AUTH),
            ("_on_logged_in",), ("_unbusy", BUSY_AUTH),
            ("_count_sent", False, len(b"Subject: a\r\n\r\nhi\r\n")),
        ]
    finally:
        h.close()


# ----------------------------------------------------------------- the same sessions, both builds


def _run_transcripts(core: str, template: str, root: str) -> None:
    """In a fresh interpreter: run the sessions of _SCRIPT on ``core``; print JSON."""
    if core == "python":
        sys.modules[CORE] = None  # type: ignore[assignment]  # an ImportError: fastpop._compiled takes the twin
    import logging

    from support.inprocess import Harness

    from fastpop import _compiled
    from fastpop.session import _core_py

    h = Harness(Path(root), auth_failure_delay=0.01, auth_apop=True, max_bad_commands=20)
    shutil.copy(Path(template) / "passwd", h.passwd)
    shutil.rmtree(h.mail)
    shutil.copytree(Path(template) / "mail", h.mail)
    h.ctx.new_timestamp = lambda: TIMESTAMP  # type: ignore[method-assign]
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.levelname} {record.name} {record.getMessage()}")

    logger = logging.getLogger("fastpop")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Collect())

    def fields(proto) -> dict[str, str]:
        out = {}
        for name in _core_py.SessionCore.__slots__:
            value = getattr(proto, name)
            if name == "_table":
                value = "authorization" if value is type(proto)._authorization_table else "transaction"
            elif isinstance(value, float):
                value = "float"
            elif value is not None and not isinstance(value, (bool, int, str, bytes, bytearray, list)):
                value = type(value).__name__
            out[name] = repr(value)
        return out

    result: dict = {"core": _compiled.LOADED[CORE], "sessions": []}
    for peer, steps in _SCRIPT:
        s = h.connect(peer=peer)
        t = s.transport
        turns = [{"greeting": s.greeting.decode("latin-1"), "fields": fields(s.protocol)}]
        for step in steps:
            if step == b"<disconnect>":
                s.disconnect()
            else:
                t.peer_send(step)
            h.wait_for(lambda s=s, t=t: t.lost or (s.protocol._busy == 0 and not t.inbound), what="the replies")
            h.turns(2)
            turns.append({"sent": step.decode("latin-1"), "got": t.take().decode("latin-1"),
                          "fields": fields(s.protocol), "log": records[:]})
            records.clear()
        result["sessions"].append(turns)
    h.close()
    print(json.dumps(result))


def _apop(user: str, password: str) -> bytes:
    return f"APOP {user} {hashlib.md5((TIMESTAMP + password).encode()).hexdigest()}\r\n".encode()


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


_SCRIPT: list[tuple[str, list[bytes]]] = [
    ("127.0.0.1", [
        b"CAPA\r\n", b"NOOP\r\n", b"FOO bar\r\n", b"PASS x\r\n", b"USER\r\n",
        b"USER " + b"x" * 300 + b"\r\n", b"USER bad\x01\r\n", b"USER al/ice\r\n",
        b"USER alice\r\nPASS wrong\r\n",
        b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\nLIST 2\r\nUIDL 3\r\nLIST 99\r\nLIST x\r\nLIST 1 2\r\n",
        b"DELE 1\r\nDELE 1\r\nRETR 1\r\nSTAT\r\nLIST\r\nUIDL\r\nRSET\r\nSTAT\r\n",
        b"RETR 2\r\nDELE 2\r\nDELE 3\r\nTOP 1 1\r\n",
        b"CAPA\r\nNOOP\r\nNOOP x\r\nSTAT x\r\nUSER alice\r\nRSET x\r\nDELE\r\nRETR 1\r\nRETR 4\r\nSTAT\r\n",
        b"QUIT\r\n",
    ]),
    ("192.0.2.7", [  # untrusted, no TLS: no plaintext login
        b"CAPA\r\n", b"USER alice\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n", b"STLS\r\n", b"QUIT\r\n",
    ]),
    ("127.0.0.1", [  # AUTH with an initial response, bad commands until the limit
        b"AUTH PLAIN " + _plain("alice", "secret") + b"\r\n", b"STAT\r\n",
        b"XYZ\r\n" * 20 + b"STAT\r\n",
    ]),
    ("127.0.0.1", [  # SASL continuation lines, a cancel, APOP, a dropped connection
        b"AUTH LOGIN\r\n", b"*\r\n", b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n",
        base64.b64encode(b"secret") + b"\r\n", b"UIDL 1\r\nDELE 2\r\n", b"<disconnect>",
    ]),
    ("127.0.0.1", [_apop("alice", "wrong"), _apop("alice", "secret"), b"STAT\r\nQUIT\r\n"]),
    ("127.0.0.1", [b"UTF8\r\n", b"USER alice\r\nPASS secret\r\nQUIT\r\n", b"QUIT\r\n"]),
]


def _transcripts(core: str, template: Path, root: Path) -> dict:
    env = dict(os.environ)
    env.pop("FASTPOP_NO_EXTENSIONS", None)  # this test chooses the core itself
    proc = subprocess.run([sys.executable, __file__, core, str(template), str(root)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_both_builds_answer_the_same_sessions_the_same(tmp_path):  # e2e: two interpreters
    from support.inprocess import Harness

    from fastpop import _compiled

    if _compiled.NO_EXTENSIONS:
        pytest.skip("FASTPOP_NO_EXTENSIONS: the pure-Python twins only")
    template = Harness(tmp_path / "template")
    try:
        template.add_user("alice", messages=[
            b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n.dot line\r\nsecond\r\n",
            b"Subject: three\r\n\r\n" + b"x" * 5000 + b"\r\n",
            b"Subject: four\r\n\r\n" + b"y" * 70 + (b"\r\n" + b"y" * 70) * 3000 + b"\r\n",  # streamed
        ])
    finally:
        template.close()
    compiled = _transcripts("compiled", tmp_path / "template", tmp_path / "c")
    python = _transcripts("python", tmp_path / "template", tmp_path / "p")
    assert (compiled["core"], python["core"]) == ("cython", "python")
    for c_session, p_session in zip(compiled["sessions"], python["sessions"], strict=True):
        for c_turn, p_turn in zip(c_session, p_session, strict=True):
            assert c_turn == p_turn
    got = "".join(turn.get("got", "") for session in compiled["sessions"] for turn in session)
    for reply in ("+OK Logged in.", "Authentication failed.", "Authentication cancelled.", "VXNlcm5hbWU6",
                  "Too many bad commands.", "..dot line", "+OK 216089 octets", "messages deleted."):
        assert reply in got, reply  # the script reaches what it means to compare


@pytest.mark.unit
def test_the_pxd_declares_only_what_the_twin_has():
    """A field or method in _core.pxd that the .py lacks would be a C-only
    addition the twin cannot have: both builds come from the one .py."""
    from fastpop.session import _core_py

    tree = ast.parse(Path(_core_py.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SessionCore")
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    fields, cdef, cpdef = _pxd()
    assert fields == set(_core_py.SessionCore.__slots__), fields ^ set(_core_py.SessionCore.__slots__)
    assert cdef | cpdef <= methods, sorted((cdef | cpdef) - methods)


if __name__ == "__main__":
    _run_transcripts(*sys.argv[1:4])
