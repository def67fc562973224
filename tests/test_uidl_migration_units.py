"""The parsers behind UIDL migrations, in process: Courier's
courierpop3dsizelist (fastpop.store.courier), the RFC 1939 replacement of
UIDLs that are not valid, and the mbox spool splitter of ``fastpop import
mbox`` (fastpop.delivery.mbox_import).  Served end to end in
tests/test_uidl_migration.py."""

from __future__ import annotations

import hashlib
import os

import pytest

from fastpop.delivery import mbox_import as mb
from fastpop.store import courier, maildir_names

pytestmark = pytest.mark.unit


def test_courier_versions_2_and_3():
    listed = courier.parse(
        b"/3 7 1700000000\n"
        b"1700000001.M1P1.host,S=120:2,S 120 3:1700000000:0\n"
        b"1700000002.M2P2.host 99 4:1700000000:1\n"
        b"1700000003.M3P3.host:2, 10 5:0:0\n"
        b"odd name with spaces 10 6:1700000000:0\n"
    )
    assert listed == {
        "1700000001.M1P1.host,S=120": "UID3-1700000000",  # the part before ":" names the message
        "1700000002.M2P2.host": "UID4-1700000000",
        "1700000003.M3P3.host": "UID5",  # UIDVALIDITY 0: "UID<n>", as Courier prints it
        "odd name with spaces": "UID6-1700000000",  # split at the last two spaces, as Courier
    }
    assert courier.parse(b"/2 3 42\na.b.c 10 1:42\nd.e.f 11 2:42\n") == {"a.b.c": "UID1-42", "d.e.f": "UID2-42"}


def test_courier_uid_0_is_the_escaped_file_name():
    listed = courier.parse(b"/2 1 42\n1700000001.M1'P\"1+x.host:2,S 10 0:42\n")
    assert listed == {"1700000001.M1'P\"1+x.host": "1700000001.M1+27P+221+2Bx.host"}
    assert courier.filename_uidl(b"a b\x7f\xc3\xa9:2,") == "a+20b+7F+C3+A9"


@pytest.mark.parametrize("data", [
    b"", b"/1 3 42\na 1 1:42\n", b"/4 3 42\na 1 1:42\n", b"2 3 42\na 1 1:42\n", b"/3\n", b"/3 x 1\n",
    b"\x00\xff" * 1000, b"/3 3 42",  # no newline after the header: nothing finished
])
def test_courier_files_courier_would_not_read(data):
    assert courier.parse(data) == {}


def test_courier_bad_lines_are_skipped_alone():
    listed = courier.parse(
        b"/3 9 42\n"
        b"good.one 10 1:42:0\n"
        b"no-size 1:42:0\n"  # too few fields
        b"bad.size x 2:42:0\n"
        b"bad.uid 10 x:42:0\n"
        b"too.many 10 3:42:0:1\n"
        b"../../etc/passwd.x 10 4:42:0\n"  # a key only: what follows the last "/", as Courier compares
        b".hidden 10 5:42:0\n"
        b"huge " + b"9" * 50 + b" 6:42:0\n"
        b"\xff\xfe\x00 10 7:42:0\n"
        + b"x" * 100_000 + b" 10 8:42:0\n"  # longer than Courier's line buffer: cut, so not parsed
        b"last.one 10 9:42:0\n"
        b"unfinished 10 10:42:0"
    )
    assert listed == {"good.one": "UID1-42", "passwd.x": "UID4-42", "last.one": "UID9-42"}


def test_safe_uidl_keeps_valid_ones_and_replaces_others_deterministically():
    assert courier.safe_uidl("UID1-42") == "UID1-42"
    assert courier.safe_uidl("x" * 70) == "x" * 70
    for bad in ("x" * 71, "has space", "tab\there", "é", "\x7f", ""):
        replaced = courier.safe_uidl(bad)
        assert replaced == hashlib.md5(bad.encode()).hexdigest() == courier.safe_uidl(bad)
        assert courier.valid_uidl(replaced)
    # the rule Maildir names always had: their UIDLs do not change
    long_name = "1700000001.M1P1." + "h" * 80
    assert maildir_names.uidl_of(long_name + ",S=1:2,S") == hashlib.md5(long_name.encode()).hexdigest()


def test_courier_read_refuses_links_fifos_and_huge_files(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert courier.read(fd) == {}  # none
        (tmp_path / "target").write_bytes(b"/3 2 42\na.b.c 1 1:42:0\n")
        (tmp_path / courier.SIZELIST).symlink_to(tmp_path / "target")
        assert courier.read(fd) == {}
        (tmp_path / courier.SIZELIST).unlink()
        os.mkfifo(tmp_path / courier.SIZELIST)
        assert courier.read(fd) == {}  # and did not block
        (tmp_path / courier.SIZELIST).unlink()
        with open(tmp_path / courier.SIZELIST, "wb") as f:
            f.write(b"/3 2 42\na.b.c 1 1:42:0\n")
            f.truncate(courier.MAX_BYTES + 1)
        assert courier.read(fd) == {}
        (tmp_path / courier.SIZELIST).write_bytes(b"/3 2 42\na.b.c 1 1:42:0\n")
        assert courier.read(fd) == {"a.b.c": "UID1-42"}
    finally:
        os.close(fd)


SPOOL = (
    b"From alice@example.com Thu Dec  3 10:00:00 2026\n"
    b"From: alice@example.com\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\nStatus: RO\nSubject: one\n\n"
    b"body\n"
    b"From here on, an unquoted From_ line that is no separator\n"
    b"\n"
    b"From the blank line above either: it has no time\n"
    b">From quoted once\n"
    b">>From quoted twice\n"
    b"\n"
    b"From bob@example.com Thu Dec  3 11:00:00 2026\n"
    b"Subject: two\nx-uidl:   spaced-uidl  \nX-UIDL: second-one-ignored\n\nX-UIDL: in the body, ignored\n\n"
    b"From carol@example.com Thu Dec  3 12:00:00 2026\n"
    b"Subject: three\n\nno newline at the end"
)


def _spool(tmp_path, data: bytes) -> int:
    path = tmp_path / "spool"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_mbox_split_quoting_and_x_uidl(tmp_path):
    fd = _spool(tmp_path, SPOOL)
    try:
        spans = mb.scan(fd)
        got = [mb.read_message(fd, s) for s in spans]
        rd = [mb.read_message(fd, s, "mboxrd") for s in spans]
    finally:
        os.close(fd)
    assert len(spans) == 3
    assert got[0] == (b"From: alice@example.com\nX-UIDL: 5d41402abc4b2a76b9719d911017c592\nStatus: RO\n"
                      b"Subject: one\n\nbody\nFrom here on, an unquoted From_ line that is no separator\n\n"
                      b"From the blank line above either: it has no time\n>From quoted once\n>>From quoted twice\n")
    assert rd[0].endswith(b"\nFrom quoted once\n>From quoted twice\n")  # mboxrd: one '>' less
    assert got[1] == (b"Subject: two\nx-uidl:   spaced-uidl  \nX-UIDL: second-one-ignored\n\n"
                      b"X-UIDL: in the body, ignored\n")
    assert got[2] == b"Subject: three\n\nno newline at the end"  # kept as it was
    assert [s.x_uidl for s in spans] == ["5d41402abc4b2a76b9719d911017c592", "spaced-uidl", None]
    assert mb.from_time(spans[0].from_line) == 1796292000.0
    assert mb.from_time(b"From x@y no date") is None
    assert mb.from_time(b"From x@y Thu Foo  3 10:00:00 2026") is None


def test_mbox_long_lines_are_read_in_pieces(tmp_path):
    body = b"A" * (5 * mb._CHUNK + 17) + b"\nFrom x Thu Dec  3 10:00:00 2026 in a long line" * 3
    data = b"From a@b Thu Dec  3 10:00:00 2026\nSubject: long\n\n" + body + b"\n"
    fd = _spool(tmp_path, data)
    try:
        spans = mb.scan(fd)
        assert len(spans) == 1  # no empty line before those From_ lines: body
        assert mb.read_message(fd, spans[0]) == b"Subject: long\n\n" + body + b"\n"
    finally:
        os.close(fd)


@pytest.mark.parametrize("data", [
    b"\x00\xff\xfe garbage" * 1000,
    b"Subject: no From_ line\n\nbody\n",
    b"\nFrom a@b Thu Dec  3 10:00:00 2026\nSubject: x\n\n",
])
def test_mbox_that_is_not_one_is_refused(tmp_path, data):
    fd = _spool(tmp_path, data)
    try:
        with pytest.raises(mb.ImportRefused, match="not an mbox"):
            mb.scan(fd)
    finally:
        os.close(fd)


def test_mbox_message_over_the_limit_is_refused(tmp_path):
    fd = _spool(tmp_path, b"From a@b Thu Dec  3 10:00:00 2026\nSubject: big\n\n" + b"x" * 5000 + b"\n")
    try:
        with pytest.raises(mb.ImportRefused, match="larger than 1000 bytes"):
            mb.scan(fd, max_message=1000)
    finally:
        os.close(fd)
    fd = _spool(tmp_path, b"")
    try:
        assert mb.scan(fd) == []  # an empty spool: nothing to import
    finally:
        os.close(fd)


def test_header_x_uidl():
    assert mb.header_x_uidl(b"Subject: a\r\nx-uidl:  abc \r\nX-UIDL: second\r\n\r\n") == "abc"
    assert mb.header_x_uidl(b"Subject: a\n\nX-UIDL: in the body\n") is None
    assert mb.header_x_uidl(b"X-UIDL:\nSubject: empty value\n\n") is None
    assert mb.header_x_uidl(b"\x00\xff" * 5000) is None  # garbage: no header, no error


def test_c_client_folder_internal_data_is_not_mail(tmp_path):
    data = (b"From MAILER-DAEMON Thu Dec  3 09:00:00 2026\n"
            b"Date: Thu, 3 Dec 2026 09:00:00 +0000\nSubject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA\n"
            b"X-IMAP: 1700000000 0000000002\n\nThis text is part of the internal format of your mail folder.\n\n"
            b"From a@b Thu Dec  3 10:00:00 2026\nSubject: DON'T DELETE THIS MESSAGE -- a user's own\n\nx\n")
    fd = _spool(tmp_path, data)
    try:
        spans = mb.scan(fd)
    finally:
        os.close(fd)
    assert [s.internal for s in spans] == [True, False]  # X-IMAP and that subject: the first only
