"""The PROXY protocol header, versions 1 and 2 (HAProxy's proxy-protocol.txt).

A load balancer that relays a TCP connection (HAProxy with ``send-proxy`` or
``send-proxy-v2``) writes one header before anything else, naming the
client's address; fastpop reads it on the listeners configured for it
(``[proxy] listen``, see ``fastpop.session.proxied``).  This module only parses:
``parse(data)`` looks at the bytes received so far and returns

- ``None`` while they are a valid beginning of a header (wait for more),
- a ``ProxyHeader`` once the header is complete (``length`` says how many
  bytes it took: what follows is the client's first POP3 bytes),
- or raises ``ProxyHeaderError`` as soon as the bytes cannot be one.

It never looks beyond the header and keeps no state, so a caller may feed it
the whole buffer again on each read.  Sizes are bounded: a version 1 line is
at most 107 bytes with its CRLF (the spec's worst case), a version 2 header
at most ``MAX_V2_HEADER`` bytes.

Version 1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` with exactly one space
between fields, no leading zeros, the family matching the addresses; ``PROXY
UNKNOWN ...\\r\\n`` means "keep the connection's own addresses".

Version 2: the 12-byte signature, version 2, command LOCAL (a health check:
keep the connection's own addresses) or PROXY, a family and transport byte,
the length of what follows, then the addresses and TLVs.  AF_INET and
AF_INET6 over STREAM give the client's address; AF_UNSPEC, AF_UNIX and
non-STREAM transports keep the connection's own (the spec allows that).
TLVs are walked (one that overruns the header is an error) and skipped,
except PP2_TYPE_SSL: its PP2_CLIENT_SSL bit says the client reached the
proxy over TLS (``tls``), and the PP2_SUBTYPE_SSL_VERSION sub-TLV its
version.  PP2_TYPE_CRC32C is not verified (optional for a receiver).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", the spec's worst case
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_V2_HEADER = 4096  # HAProxy's, TLVs included, are a few hundred bytes

LOCAL, PROXY = 0x0, 0x1  # version 2 commands
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
T_UNSPEC, T_STREAM, T_DGRAM = 0x0, 0x1, 0x2
_ADDRESS_BLOCK = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_CLIENT_SSL = 0x01

_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")


class ProxyHeaderError(ValueError):
    """The bytes are not (the beginning of) a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes the header took
    source: tuple[str, int] | None  # the client's address and port; None: keep the connection's
    destination: tuple[str, int] | None  # the address and port the client connected to
    local: bool = False  # v2 LOCAL (the proxy's own connection, e.g. a health check)
    tls: bool = False  # v2 PP2_TYPE_SSL with PP2_CLIENT_SSL: the client came over TLS
    tls_version: str | None = None  # from PP2_SUBTYPE_SSL_VERSION, e.g. "TLSv1.3"


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of ``data``; None if more bytes are needed."""
    data = memoryview(data)
    n = len(data)
    if n == 0:
        return None
    if data[0] == V1_PREFIX[0]:
        if data[: min(n, len(V1_PREFIX))] != V1_PREFIX[: min(n, len(V1_PREFIX))]:
            raise ProxyHeaderError("not a PROXY protocol header")
        return _parse_v1(bytes(data[:V1_MAX]))
    if data[: min(n, len(V2_SIGNATURE))] != V2_SIGNATURE[: min(n, len(V2_SIGNATURE))]:
        raise ProxyHeaderError("not a PROXY protocol header")
    return _parse_v2(data)


# ----------------------------------------------------------------- version 1


def _parse_v1(head: bytes) -> ProxyHeader | None:
    end = head.find(b"\r\n")
    # Only printable ASCII before the CRLF: a lone CR or LF, a NUL or a
    # control character ends it as soon as it is seen.
    for i, byte in enumerate(head if end < 0 else head[:end]):
        if not 0x20 <= byte <= 0x7E:
            if byte == 0x0D and i == len(head) - 1:
                break  # the CR of a CRLF still to come
            raise ProxyHeaderError(f"version 1: byte 0x{byte:02x} in the line")
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyHeaderError(f"version 1: no CRLF within {V1_MAX} bytes")
        return None
    fields = head[:end].split(b" ")
    length = end + 2
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, length, None, None)  # anything after UNKNOWN is ignored
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"version 1: unknown protocol {protocol[:16]!r}")
    if len(fields) != 6:
        raise ProxyHeaderError("version 1: expected PROXY TCPn SRC DST SPORT DPORT, single spaces")
    src, dst = (_v1_address(protocol, f) for f in fields[2:4])
    sport, dport = (_v1_port(f) for f in fields[4:6])
    return ProxyHeader(1, length, (src, sport), (dst, dport))


def _v1_address(protocol: bytes, text: bytes) -> str:
    pattern = _V1_IPV4 if protocol == b"TCP4" else _V1_IPV6
    if pattern.fullmatch(text):
        try:
            addr = ipaddress.ip_address(text.decode("ascii"))
        except ValueError:
            pass
        else:
            if addr.version == (4 if protocol == b"TCP4" else 6):
                return _address_text(addr)
    raise ProxyHeaderError(f"version 1: bad {protocol.decode()} address {text[:40]!r}")


def _v1_port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"version 1: bad port {text[:8]!r}")
    return int(text)


# ----------------------------------------------------------------- version 2


def _parse_v2(data: memoryview) -> ProxyHeader | None:
    n = len(data)
    if n > 12:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            raise ProxyHeaderError(f"version 2: bad version {ver_cmd >> 4}")
        if ver_cmd & 0xF not in (LOCAL, PROXY):
            raise ProxyHeaderError(f"version 2: bad command {ver_cmd & 0xF}")
    if n > 13:
        family, transport = data[13] >> 4, data[13] & 0xF
        if family not in _ADDRESS_BLOCK or transport not in (T_UNSPEC, T_STREAM, T_DGRAM):
            raise ProxyHeaderError(f"version 2: bad family/transport 0x{data[13]:02x}")
    if n < V2_FIXED:
        return None
    body_length = int.from_bytes(data[14:16], "big")
    length = V2_FIXED + body_length
    if length > MAX_V2_HEADER:
        raise ProxyHeaderError(f"version 2: header of {length} bytes (at most {MAX_V2_HEADER})")
    if n < length:
        return None
    if data[12] & 0xF == LOCAL:
        return ProxyHeader(2, length, None, None, local=True)  # the address block is ignored
    body = bytes(data[V2_FIXED:length])
    block = _ADDRESS_BLOCK[family]
    if body_length < block:
        raise ProxyHeaderError(f"version 2: {body_length} bytes cannot hold a family {family} address block ({block})")
    source = destination = None
    if transport == T_STREAM and family in (AF_INET, AF_INET6):
        size = 4 if family == AF_INET else 16
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size : 2 * size])
        sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
        dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
        source, destination = (_address_text(src), sport), (_address_text(dst), dport)
    tls, tls_version = _read_tlvs(body[block:])
    return ProxyHeader(2, length, source, destination, tls=tls, tls_version=tls_version)


def _tlvs(data: bytes, what: str):
    """(type, value) pairs; a TLV that does not fit is an error."""
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise ProxyHeaderError(f"version 2: truncated {what}")
        kind, size = data[i], int.from_bytes(data[i + 1 : i + 3], "big")
        if i + 3 + size > len(data):
            raise ProxyHeaderError(f"version 2: {what} of type 0x{kind:02x} overruns the header")
        yield kind, data[i + 3 : i + 3 + size]
        i += 3 + size


def _read_tlvs(data: bytes) -> tuple[bool, str | None]:
    tls, version = False, None
    for kind, value in _tlvs(data, "TLV"):
        if kind != PP2_TYPE_SSL:
            continue
        if len(value) < 5:
            raise ProxyHeaderError("version 2: SSL TLV shorter than 5 bytes")
        tls = bool(value[0] & PP2_CLIENT_SSL)
        for sub, text in _tlvs(value[5:], "SSL sub-TLV"):
            if sub == PP2_SUBTYPE_SSL_VERSION:
                version = text.decode("ascii", "replace")[:32]
    return tls, version


def _address_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack proxy's IPv4 client) as IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# ----------------------------------------------------------------- building (tests, tools)


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A version 1 header (UNKNOWN without addresses)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None, *, local: bool = False,
             tlvs: bytes = b"") -> bytes:
    """A version 2 header: PROXY over TCP (or LOCAL / AF_UNSPEC without addresses), TLVs appended."""
    if local or source is None or destination is None:
        body, fam = b"", 0x00
    else:
        src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
        if src.version != dst.version:
            raise ValueError("source and destination of different families")
        fam = 0x11 if src.version == 4 else 0x21
        body = src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    body += tlvs
    ver_cmd = 0x20 | (LOCAL if local else PROXY)
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + len(body).to_bytes(2, "big") + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind,)) + len(value).to_bytes(2, "big") + value
