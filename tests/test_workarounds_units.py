"""Unit tests of the client workarounds' pieces (tests/test_workarounds.py
runs them end to end): the small-message transform with each workaround, the
NUL scan that decides sendfile, TopLimiter's header state, SASL responses
with blanks, and the settings."""

from __future__ import annotations

import os

import pytest

from fastpop.auth.sasl import decode_response
from fastpop.cli import build_parser, config_from_args
from fastpop.config import Config, load_toml
from fastpop.session.sending import (
    ADD_EOH,
    NO_NULS,
    SCAN_WINDOW,
    has_nul,
    render_small,
    workaround_flags,
)
from fastpop.wire.stuffing import DotStuffer, TopLimiter

pytestmark = pytest.mark.unit

HEADER_ONLY = b"Subject: x\r\nFrom: y\r\n"


def test_flags_of_the_names():
    assert workaround_flags([]) == 0
    assert workaround_flags(["outlook-no-nuls"]) == NO_NULS
    assert workaround_flags(["oe-ns-eoh"]) == ADD_EOH
    assert workaround_flags(["oe-ns-eoh", "outlook-no-nuls"]) == NO_NULS | ADD_EOH


@pytest.mark.parametrize("top", [None, 0, 3])
def test_no_nuls_replaces_every_nul_and_nothing_else(top):
    data = b"\x00Subject: \x00x\r\n\r\n\x00\r\n.\x00dot\r\nend\x00"
    plain = render_small(data, top)
    out = render_small(data, top, NO_NULS)
    assert b"\x00" in plain and b"\x00" not in out
    assert out == plain.replace(b"\x00", b"\x80")  # the same transform, the same length
    assert render_small(data, top, ADD_EOH) == plain  # the message has its empty line


def test_add_eoh_only_for_top_of_a_message_without_an_empty_line():
    assert render_small(HEADER_ONLY, 0, ADD_EOH) == HEADER_ONLY + b"\r\n"
    assert render_small(HEADER_ONLY, 10, ADD_EOH) == HEADER_ONLY + b"\r\n"
    assert render_small(b"Subject: x", 0, ADD_EOH) == b"Subject: x\r\n\r\n"
    assert render_small(b"Subject: x\n", 0, ADD_EOH) == b"Subject: x\r\n\r\n"  # bare LF
    assert render_small(HEADER_ONLY, None, ADD_EOH) == HEADER_ONLY  # RETR: untouched
    assert render_small(HEADER_ONLY, 0) == HEADER_ONLY  # off: untouched
    assert render_small(b"\r\nbody\r\n", 0, ADD_EOH) == b"\r\n"  # an empty header, then its empty line
    assert render_small(b"", 0, ADD_EOH) == b"\r\n"


def test_top_limiter_knows_when_the_header_ended():
    for chunks in ([b"A: b\r\n", b"\r\n", b"body\r\n"], [b"A: b\r\n\r\nbody\r\n"], [b"\r\n", b"body\r\n"]):
        stuffer, limiter = DotStuffer(), TopLimiter(5)
        assert limiter.in_headers
        for chunk in chunks:
            limiter.feed(stuffer.feed(chunk))
        assert not limiter.in_headers, chunks
    stuffer, limiter = DotStuffer(), TopLimiter(5)
    for chunk in (b"A: b\r", b"\nC: d\r\n"):
        limiter.feed(stuffer.feed(chunk))
    limiter.feed(stuffer.finish())
    assert limiter.in_headers


def test_has_nul_reads_the_whole_file(tmp_path):
    path = tmp_path / "m"
    size = 2 * SCAN_WINDOW + 100
    for at, want in ((None, False), (0, True), (SCAN_WINDOW - 1, True), (SCAN_WINDOW, True), (size - 1, True)):
        data = bytearray(b"x" * size)
        if at is not None:
            data[at] = 0
        path.write_bytes(bytes(data))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert has_nul(fd, size) is want, at
            assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # pread: the offset is left alone
            if at is not None and at > 0:
                assert has_nul(fd, at) is False  # only the first ``size`` octets count
        finally:
            os.close(fd)
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert has_nul(fd, 0) is False
        assert has_nul(fd, 10) is False  # a file shorter than said
    finally:
        os.close(fd)


def test_sasl_responses_ignore_blanks_around_them():
    assert decode_response(b"dGVzdA==") == b"test"
    assert decode_response(b"dGVzdA== ") == b"test"
    assert decode_response(b" \tdGVzdA==\t ") == b"test"
    assert decode_response(b"= ") == b""
    assert decode_response(b"dGVz dA==") is None  # inside: still not base64
    assert decode_response(b" ") == b""


def test_settings(tmp_path):
    assert Config().client_workarounds == [] and Config().pop3_last is False  # none by default, as Dovecot
    path = tmp_path / "f.toml"
    path.write_text('[pop3]\nclient_workarounds = ["outlook-no-nuls", "oe-ns-eoh"]\nlast = true\n')
    config = load_toml(str(path))
    assert config.client_workarounds == ["outlook-no-nuls", "oe-ns-eoh"] and config.pop3_last is True
    config.validate()
    config.client_workarounds = ["outlook-no-nuls", "netscape-eoh"]
    with pytest.raises(ValueError, match="netscape-eoh"):
        config.validate()
    args = build_parser().parse_args(["serve", "--client-workarounds", "Outlook-No-Nuls, oe-ns-eoh", "--pop3-last"])
    config = config_from_args(args)
    assert config.client_workarounds == ["outlook-no-nuls", "oe-ns-eoh"] and config.pop3_last is True
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert config.client_workarounds == [] and config.pop3_last is False
