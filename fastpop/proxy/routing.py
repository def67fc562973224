"""Which backend a user's session goes to, and which backends are up.

A user whose record has a ``host`` field (and optionally ``port``) goes
there, always.  Any other user goes to one of ``[backends] servers``,
chosen by rendezvous (highest random weight) hashing of the user name: each
backend scores ``blake2b(name, backend)`` and the highest score wins, so a
user keeps their backend as long as it stays in the list, and adding or
removing one backend moves only the users it wins or held.

Health: every ``[backends] health_interval`` seconds each configured
backend is connected to (with a PROXY v2 LOCAL header when the backends
expect headers) and must greet with ``+OK`` within ``connect_timeout``; a
backend that fails (or that a login could not reach) is marked down, and up
again at its next good check.  A user whose backend is down gets
``-ERR [SYS/TEMP]`` at once; with ``[backends] rehash = true`` (for backends
sharing one store, e.g. NFS) the user goes to the best-scoring backend that
is up instead.  Backends with their own storage must keep the default
(``false``): a user sent elsewhere would find an empty mailbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

from fastpop.net import parse_address
from fastpop.wire.proxy_protocol import build_v2

if TYPE_CHECKING:
    from fastpop.auth.passwd_file import UserRecord
    from fastpop.config import Config

log = logging.getLogger("fastpop.proxy")


class Backend:
    """One backend: its address and whether it is thought up."""

    __slots__ = ("host", "port", "up", "key", "checked")

    def __init__(self, host: str, port: int, checked: bool = True) -> None:
        self.host = host
        self.port = port
        self.up = True  # until a check or a login says otherwise
        self.key = f"{host}:{port}".encode()
        self.checked = checked  # one of [backends] servers (health-checked)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def score(name: str, backend: Backend) -> int:
    """The rendezvous weight of a backend for a user name."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass") + b"\0" + backend.key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


class NoBackend(Exception):
    """No backend for this user: none configured and no host field, or its backend is down."""


class Router:
    """Picks backends and keeps their health (one per process)."""

    def __init__(self, config: Config) -> None:
        self.port = config.backend_port
        self.rehash = config.backend_rehash
        self.timeout = config.backend_connect_timeout
        self.interval = config.backend_health_interval
        self.proxy_header = config.backend_proxy_header
        self.backends: list[Backend] = []
        for addr in config.backend_servers:
            host, port = parse_address(addr)
            self.backends.append(Backend(host, port))
        self._by_key = {b.key: b for b in self.backends}
        self._task: asyncio.Task | None = None

    def pick(self, name: str, record: UserRecord) -> Backend:
        """The backend of a user (raises NoBackend)."""
        extra = record.extra or {}
        host = extra.get("host") or extra.get("userdb_host")  # (a passwd-file keeps the prefix)
        if host:
            port_text = extra.get("port") or extra.get("userdb_port") or ""
            port = int(port_text) if port_text.isascii() and port_text.isdigit() else self.port
            backend = self._by_key.get(f"{host}:{port}".encode())
            if backend is None:  # not one of [backends] servers: not health-checked, always tried
                return Backend(host, port, checked=False)
            if not backend.up:
                raise NoBackend(f"backend {backend} is down")
            return backend
        if not self.backends:
            raise NoBackend("no host field and no [backends] servers")
        ranked = sorted(self.backends, key=lambda b: score(name, b), reverse=True)
        if ranked[0].up:
            return ranked[0]
        if self.rehash:
            for backend in ranked[1:]:
                if backend.up:
                    log.info("backend %s down: user=%s rehashed to %s", ranked[0], name, backend)
                    return backend
        raise NoBackend(f"backend {ranked[0]} is down")

    def failed(self, backend: Backend, reason: str) -> None:
        """A login could not reach it: down until its next good health check."""
        if backend.checked and backend.up and self.interval > 0:
            backend.up = False
            log.warning("backend %s down: %s", backend, reason)

    # ----------------------------------------------------------- health checks

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.backends and self.interval > 0 and self._task is None:
            self._task = loop.create_task(self._health_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check_one(b) for b in self.backends))
            await asyncio.sleep(self.interval)

    async def _check_one(self, backend: Backend) -> None:
        reason = await self.check(backend)
        if reason is None and not backend.up:
            backend.up = True
            log.info("backend %s up", backend)
        elif reason is not None and backend.up:
            backend.up = False
            log.warning("backend %s down: %s", backend, reason)

    async def check(self, backend: Backend) -> str | None:
        """None if the backend greets with +OK in time, else why not."""
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(backend.host, backend.port), self.timeout)
            if self.proxy_header:
                writer.write(build_v2(None, None, local=True))  # a health check: the proxy's own address
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            if not line.startswith(b"+OK"):
                return f"greeting {line[:64]!r}"
            writer.write(b"QUIT\r\n")
            return None
        except asyncio.TimeoutError:
            return f"no greeting within {self.timeout:g} s"
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        finally:
            if writer is not None:
                writer.close()
