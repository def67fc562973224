"""EXPIRE's and the quota's parsing (fastpop.store.expire, fastpop.store.maildirsize):
user-written input that must never delete or bounce mail by mistake."""

from __future__ import annotations

import os

import pytest

from fastpop.store import expire, maildirsize

pytestmark = pytest.mark.unit


def test_parse_days():
    assert expire.parse_days("NEVER") is None
    assert expire.parse_days("never") is None
    assert expire.parse_days("0") == 0
    assert expire.parse_days("30") == 30
    for bad in ("", "-1", "3d", "²", "1e3", "9999999"):
        with pytest.raises(ValueError):
            expire.parse_days(bad)


def test_days_for_user_fields_and_a_typo_is_never():
    assert expire.days_for(None, "NEVER") is None
    assert expire.days_for({}, "7") == 7
    assert expire.days_for({"pop3_expire": "0"}, "7") == 0
    assert expire.days_for({"expire": "NEVER"}, "7") is None
    assert expire.days_for({"pop3_expire": "soon"}, "7") is None  # never the default: a typo deletes nothing


def test_read_skips_garbage_lines(tmp_path):
    (tmp_path / "fastpop.retrieved").write_bytes(
        b"100 uid-a\nnonsense\n-5 uid-b\n200 \n\xff\xfe uid-c\n300 uid-d\n400 uid-a\n")
    assert expire.read(str(tmp_path), os.geteuid()) == {"uid-a": 100, "uid-d": 300}


def test_read_refuses_a_fifo_or_a_link(tmp_path):
    os.mkfifo(tmp_path / "fastpop.retrieved")
    with pytest.raises(OSError):
        expire.read(str(tmp_path), os.geteuid())  # not opened blocking, not read
    os.unlink(tmp_path / "fastpop.retrieved")
    (tmp_path / "target").write_text("1 x\n")
    os.symlink(tmp_path / "target", tmp_path / "fastpop.retrieved")
    with pytest.raises(OSError):
        expire.read(str(tmp_path), os.geteuid())


def test_parse_limits():
    assert maildirsize.parse_limits("1000000S,1000C") == (1000000, 1000)
    assert maildirsize.parse_limits("5000S") == (5000, 0)
    assert maildirsize.parse_limits("10C") == (0, 10)
    assert maildirsize.parse_limits("0S,0C") == (0, 0)
    for bad in ("lots", "100", "S", "10X", "-1S"):
        with pytest.raises(ValueError):
            maildirsize.parse_limits(bad)
