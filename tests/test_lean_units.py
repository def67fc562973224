"""The lean login's rules, in-process (issue 19): when new/'s stamp may
stand for a listing, and the effective uid asked once.  Behaviour through
real servers: tests/test_index.py, tests/test_lean_login.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fastpop.store import maildir, safefs
from fastpop.store.maildir import Mailbox, current_index, ensure_maildir

pytestmark = pytest.mark.unit

HOUR_NS = 3600 * 10**9


def settled_box(tmp_path: Path) -> tuple[str, int]:
    """A Maildir with one message and an index trusted for cur/'s old mtime."""
    path = str(tmp_path / "box")
    ensure_maildir(path)
    (tmp_path / "box" / "new" / "1700000000.M1P1.test").write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    owner = os.geteuid()
    Mailbox.open(path, owner).close()  # moves it to cur/
    old = time.time_ns() - HOUR_NS
    os.utime(tmp_path / "box" / "cur", ns=(old, old))
    Mailbox.open(path, owner).close()  # the index records the settled mtime
    return path, owner


def test_new_with_a_recent_mtime_is_listed_again_next_time(tmp_path):
    """An mtime within MTIME_SETTLE_NS may still change unseen in its tick:
    such a new/ is listed and its stamp not kept; once settled, it is."""
    path, owner = settled_box(tmp_path)
    new = tmp_path / "box" / "new"
    canonical = safefs.canonical_maildir(path)
    os.utime(new)  # now
    assert current_index(path, owner) is not None
    assert canonical not in maildir._empty_new
    old = time.time_ns() - HOUR_NS
    os.utime(new, ns=(old, old))
    assert current_index(path, owner) is not None
    assert maildir._empty_new[canonical][2] == old
    (new / "1700000001.M2P1.test").write_bytes(b"Subject: y\r\n\r\nho\r\n")
    assert current_index(path, owner) is None  # a message waits: the full open moves it
    assert canonical not in maildir._empty_new


def test_kept_stamps_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(maildir, "EMPTY_NEW_MAX", 3)
    monkeypatch.setattr(maildir, "_empty_new", {})
    old = time.time_ns() - HOUR_NS
    paths = []
    for i in range(5):
        path, owner = settled_box(tmp_path / str(i))
        os.utime(Path(path) / "new", ns=(old, old))
        assert current_index(path, owner) is not None
        paths.append(safefs.canonical_maildir(path))
    assert list(maildir._empty_new) == paths[2:]


def test_euid_is_asked_once_and_again_after_forget(monkeypatch):
    calls = []
    monkeypatch.setattr(safefs, "_euid", None)
    monkeypatch.setattr(os, "geteuid", lambda: calls.append(1) or 4321)
    assert safefs.euid() == 4321 and safefs.euid() == 4321 and safefs.served_uid(7) == 4321
    assert len(calls) == 1
    safefs.forget_euid()
    monkeypatch.setattr(os, "geteuid", lambda: calls.append(1) or 0)
    assert safefs.served_uid(7) == 7 and safefs.served_uid(None) == safefs.ANY_OWNER
    assert len(calls) == 2
