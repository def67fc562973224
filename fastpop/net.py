"""Network addresses: listen addresses, networks to test clients against,
and the unit of per-client accounting.  Imports nothing from fastpop."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPV6_PREFIX = 64


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
