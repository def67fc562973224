"""The PROXY protocol header parser (fastpop.wire.proxy_protocol), without a server:
versions 1 and 2, good and malformed, whole and in pieces."""

from __future__ import annotations

import pytest

from fastpop.wire.proxy_protocol import (
    MAX_V2_HEADER,
    PP2_TYPE_SSL,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    build_v1,
    build_v2,
    parse,
    tlv,
)

pytestmark = pytest.mark.unit

COMMAND = b"CAPA\r\n"


def pieces(data: bytes):
    """Every proper prefix: each must ask for more, never fail."""
    for i in range(len(data)):
        yield data[:i]


def check_incremental(header: bytes) -> ProxyHeader:
    for prefix in pieces(header):
        assert parse(prefix) is None, prefix
    parsed = parse(header + COMMAND)  # the first command bytes stay after the header
    assert parsed is not None and parsed.length == len(header)
    assert parse(header) == parsed
    return parsed


# ----------------------------------------------------------------- version 1


@pytest.mark.parametrize("line, source, destination", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\n", ("192.0.2.7", 56324), ("198.51.100.1", 110)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:db8::7 2001:DB8::1 1 995\r\n", ("2001:db8::7", 1), ("2001:db8::1", 995)),
    (b"PROXY TCP6 ::ffff:c000:207 ::1 40000 110\r\n", ("192.0.2.7", 40000), ("::1", 110)),  # mapped: as IPv4
])
def test_v1_good(line, source, destination):
    parsed = check_incremental(line)
    assert (parsed.version, parsed.source, parsed.destination, parsed.tls) == (1, source, destination, False)


def test_v1_longest_lines():
    six = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 104 and check_incremental(line).source == ("ffff:" * 7 + "ffff", 65535)
    unknown = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(unknown) == V1_MAX
    assert check_incremental(unknown).source is None


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN whatever is here\r\n"])
def test_v1_unknown_keeps_the_connection_address(line):
    parsed = check_incremental(line)
    assert parsed.source is None and parsed.destination is None and not parsed.local


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\n",  # LF alone
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\r\n",  # lone CR
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field missing
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110 1\r\n",  # one too many
    b"PROXY TCP4  192.0.2.7 198.51.100.1 56324 110\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110 \r\n",  # trailing space
    b"PROXY TCP5 192.0.2.7 198.51.100.1 56324 110\r\n",  # unknown protocol
    b"PROXY tcp4 192.0.2.7 198.51.100.1 56324 110\r\n",  # case matters
    b"PROXY TCP4 2001:db8::7 198.51.100.1 56324 110\r\n",  # family mismatch
    b"PROXY TCP6 192.0.2.7 2001:db8::1 56324 110\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.1 56324 110\r\n",  # leading zero (octal?)
    b"PROXY TCP4 192.0.2.256 198.51.100.1 56324 110\r\n",
    b"PROXY TCP4 192.0.2 198.51.100.1 56324 110\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 056324 110\r\n",  # leading zero in a port
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 110\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 110\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 110\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 110\r\n",  # no zone ids
    b"PROXY TCP6 2001:db8:::7 ::1 1 110\r\n",
    b"PROXY TCP4 192.0.2.7\x00 198.51.100.1 1 110\r\n",
    b"PROXY \xff\r\n",
    b"PROXY\r\n",
    b"PROXY \r\n",
])
def test_v1_malformed(line):
    with pytest.raises(ProxyHeaderError):
        parse(line)


def test_v1_too_long_without_crlf():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14)
    assert len(line) == V1_MAX
    assert parse(line[:-1]) is None  # could still end in time
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse(line)
    with pytest.raises(ProxyHeaderError, match="no CRLF"):
        parse(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n")


def test_v1_bad_bytes_fail_before_the_line_ends():
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY TCP4 1.2.3.4\n")
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY TCP4 1.2\r3")
    assert parse(b"PROXY TCP4 1.2.3.4\r") is None  # CR then (maybe) LF


# ----------------------------------------------------------------- not a header at all


@pytest.mark.parametrize("data", [
    b"USER alice\r\n", b"CAPA\r\n", b"proxy TCP4", b"PROXX", b"PROXYTCP4", b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    b"\r\n\r\n\x00\r\nQUIT\r", b"\r\n\r\n\x01", b"\n", b"GET / HTTP/1.0\r\n",
])
def test_garbage_is_refused_at_once(data):
    with pytest.raises(ProxyHeaderError, match="not a PROXY protocol header"):
        parse(data)


def test_empty_waits():
    assert parse(b"") is None


# ----------------------------------------------------------------- version 2


@pytest.mark.parametrize("source, destination", [
    (("192.0.2.7", 56324), ("198.51.100.1", 110)),
    (("2001:db8::7", 1), ("2001:db8::1", 995)),
    (("::ffff:192.0.2.7", 40000), ("::ffff:198.51.100.1", 110)),
])
def test_v2_proxy(source, destination):
    parsed = check_incremental(build_v2(source, destination))
    assert parsed.version == 2 and not parsed.local and not parsed.tls
    assert parsed.source == (source[0].removeprefix("::ffff:"), source[1])
    assert parsed.destination == (destination[0].removeprefix("::ffff:"), destination[1])


def test_v2_local_keeps_the_connection_address():
    parsed = check_incremental(build_v2(None, None, local=True))
    assert parsed.local and parsed.source is None
    # LOCAL with an address block anyway: the block is skipped, not used
    header = build_v2(("192.0.2.7", 1), ("198.51.100.1", 110))
    local = header[:12] + b"\x20" + header[13:]
    parsed = check_incremental(local)
    assert parsed.local and parsed.source is None and parsed.length == len(header)


def fam_header(fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes((0x21, fam)) + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize("fam, body", [
    (0x00, b""),  # AF_UNSPEC
    (0x00, b"\x04\x00\x02ab"),  # AF_UNSPEC with bytes after it: ignored
    (0x31, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),  # AF_UNIX stream
    (0x32, bytes(216)),  # AF_UNIX datagram
    (0x10, bytes(12)),  # AF_INET, transport UNSPEC
    (0x12, bytes(12)),  # UDP over IPv4: not a TCP client, its address is not used
])
def test_v2_families_that_keep_the_connection_address(fam, body):
    parsed = check_incremental(fam_header(fam, body))
    assert parsed.source is None and not parsed.local


def test_v2_tlvs_skipped_and_ssl_noted():
    source, destination = ("192.0.2.7", 4000), ("198.51.100.1", 110)
    ssl = tlv(PP2_TYPE_SSL, b"\x01" + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES_256_GCM_SHA384"))
    tlvs = tlv(0x01, b"pop3") + tlv(0x02, b"mail.example.com") + tlv(0x04, b"") + ssl + tlv(0x05, b"id" * 60)
    parsed = check_incremental(build_v2(source, destination, tlvs=tlvs))
    assert parsed.source == source and parsed.tls and parsed.tls_version == "TLSv1.3"
    # the SSL TLV without PP2_CLIENT_SSL (the client did not use TLS)
    parsed = parse(build_v2(source, destination, tlvs=tlv(PP2_TYPE_SSL, b"\x00" + bytes(4))))
    assert parsed is not None and not parsed.tls
    # the largest header accepted
    padding = MAX_V2_HEADER - len(build_v2(source, destination)) - 3
    header = build_v2(source, destination, tlvs=tlv(0x04, bytes(padding)))
    assert len(header) == MAX_V2_HEADER and parse(header).source == source


@pytest.mark.parametrize("header, match", [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "bad version"),  # version 1 in the binary form
    (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "bad version"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "bad command"),
    (V2_SIGNATURE + b"\x2f\x11", "bad command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x00", "bad family"),  # family 4
    (V2_SIGNATURE + b"\x21\x13\x00\x0c", "bad family"),  # transport 3
    (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "cannot hold"),  # IPv4 needs 12
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "cannot hold"),  # IPv6 needs 36
    (V2_SIGNATURE + b"\x21\x31\x00\x24" + bytes(36), "cannot hold"),  # AF_UNIX needs 216
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),  # too long: refused before it arrives
    (V2_SIGNATURE + b"\x21\x11" + (MAX_V2_HEADER - 15).to_bytes(2, "big"), "at most"),
    (build_v2(("192.0.2.7", 1), ("198.51.100.1", 110), tlvs=b"\x04\x00"), "truncated TLV"),
    (build_v2(("192.0.2.7", 1), ("198.51.100.1", 110), tlvs=b"\x04\x00\x05abc"), "overruns"),
    (build_v2(("192.0.2.7", 1), ("198.51.100.1", 110), tlvs=tlv(PP2_TYPE_SSL, b"\x01\x00")), "SSL TLV"),
    (build_v2(("192.0.2.7", 1), ("198.51.100.1", 110), tlvs=tlv(PP2_TYPE_SSL, b"\x01" + bytes(4) + b"\x21\x00\x09TLS")),
     "overruns"),
])
def test_v2_malformed(header, match):
    with pytest.raises(ProxyHeaderError, match=match):
        parse(header)


def test_v2_truncated_waits_for_the_rest():
    header = build_v2(("2001:db8::7", 1), ("2001:db8::1", 110), tlvs=tlv(0x05, b"x" * 100))
    for cut in (1, 12, 13, 14, 15, 16, 30, len(header) - 1):
        assert parse(header[:cut]) is None


def test_v2_then_v1_is_one_header():
    v2 = build_v2(("192.0.2.7", 1), ("198.51.100.1", 110))
    parsed = parse(v2 + build_v1(("192.0.2.8", 2), ("198.51.100.1", 110)))
    assert parsed.length == len(v2) and parsed.source == ("192.0.2.7", 1)


def test_parse_accepts_bytearray_and_memoryview():
    header = build_v1(("192.0.2.7", 1), ("198.51.100.1", 110))
    assert parse(bytearray(header)) == parse(memoryview(header)) == parse(header)
