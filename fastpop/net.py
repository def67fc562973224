"""Network addresses: listen addresses, networks to test clients against,
and the unit of per-client accounting.  Imports nothing from fastpop."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

IPV6_PREFIX = 64
STREAM_CLOSE_WAIT = 1.0  # seconds: a closed stream's transport is gone within a loop turn or two


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close an asyncio stream and wait until it is closed.  Waiting retrieves
    the error that ended the connection (a peer that left makes the last write
    fail with EPIPE), which otherwise stays in a future that, collected before
    its protocol, is logged as "Future exception was never retrieved" with a
    traceback."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), STREAM_CLOSE_WAIT)
    except (OSError, asyncio.TimeoutError):
        pass  # what ended the connection was the caller's to handle


def address_key(ip: str) -> str:
    """The unit of accounting for an address: itself (IPv4) or its /64 (IPv6)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, IPV6_PREFIX), strict=False))
    return str(addr)


class Networks:
    """A list of networks (CIDR strings) to test addresses against."""

    _MEMO_MAX = 65536

    def __init__(self, specs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip()]
        # Every connection asks; parsing the address with ipaddress costs tens of
        # microseconds, a dict lookup almost nothing, and clients come back.
        self._memo: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        known = self._memo.get(ip)
        if known is not None:
            return known
        if len(self._memo) >= self._MEMO_MAX:
            self._memo.clear()
        self._memo[ip] = result = self._contains(ip)
        return result

    def _contains(self, ip: str) -> bool:
        if not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.networks)


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:110', '[::1]:110', ':110' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def resolve_listener(addr: str, port: int | None = None) -> tuple[int, int, int, Any]:
    """(family, type, proto, sockaddr) that ``listening_socket`` binds for ``addr``."""
    host, addr_port = parse_address(addr)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, addr_port if port is None else port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, kind, proto, sockaddr


def listening_socket(addr: str, port: int | None = None, reuse_port: bool = True, listen: bool = True,
                     backlog: int = 4096) -> socket.socket:
    """A listening TCP socket for ``addr`` (``port`` overrides its port 0), with
    SO_REUSEPORT for the workers' sockets (without it a port in use is an error);
    ``listen=False``: bound only, listening once its server starts serving.
    The POP3 and LMTP listeners (fastpop.serve.server) and the metrics
    endpoint (fastpop.serve.metrics) all come from here."""
    family, kind, proto, sockaddr = resolve_listener(addr, port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
