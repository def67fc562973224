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

The master login (``[backends] master_user`` and ``master_password_file``)
is the Router's too: the password is read as the proxy starts, before it
drops privileges (``validate``), and again at each SIGHUP, which keeps the
one read before when the serving user may not read the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING

from fastpop.auth.authenticator import read_checked_secret, serving_uids, valid_username
from fastpop.net import close_stream, parse_address
from fastpop.wire.proxy_protocol import build_v2

if TYPE_CHECKING:
    from fastpop.auth.passwd_file import UserRecord
    from fastpop.config import Config

log = logging.getLogger("fastpop.proxy")


MASTER_PASSWORD_MAX = 512  # bytes: it goes into one command line at the backend
MASTER_PASSWORD_FILE = "[backends] master_password_file"

_master_passwords: dict[str, str] = {}  # path -> the password last read there (in this process and its forks)


def validate(config: Config) -> None:
    """The [backends] checks beyond fastpop.config's, for fastpop.serve.validation
    (ValueError): the master's name and, for a proxy, its password file, read now."""
    name, path = config.backend_master_user, config.backend_master_password_file
    if name is None or path is None:
        return  # (fastpop.config: both or neither)
    # the backends split user*master at their separator: the master's name cannot hold it
    if not valid_username(name) or config.auth_master_separator in name:
        raise ValueError(f"backends master_user {name!r} is not a user name without the master separator "
                         f"{config.auth_master_separator!r}")
    if config.backend_route:
        read_master_password(path, config.user)


def read_master_password(path: str, serving_user: str | None = None) -> str:
    """The password in ``path``, checked as the server secret is (a regular
    file of root, of this uid or of ``serving_user``, that nobody else may
    read or write) and held to one line; ValueError saying what is wrong.
    A file that was read before and that this process may no longer read
    (a SIGHUP after privileges dropped, the file root's) keeps that password."""
    known = _master_passwords.get(path)
    data = read_checked_secret(path, MASTER_PASSWORD_FILE, serving_uids(serving_user), MASTER_PASSWORD_MAX + 1,
                               known=None if known is None else known.encode("utf-8"))
    if not data:
        raise ValueError(f"{MASTER_PASSWORD_FILE} {path} is empty")
    if len(data) > MASTER_PASSWORD_MAX:
        raise ValueError(f"{MASTER_PASSWORD_FILE} {path} holds more than {MASTER_PASSWORD_MAX} bytes")
    try:
        password = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{MASTER_PASSWORD_FILE} {path} is not UTF-8") from None
    # a line break or NUL would end the PASS line or the PLAIN message early
    if any(c < " " or c == "\x7f" for c in password):
        raise ValueError(f"{MASTER_PASSWORD_FILE} {path} holds a control character: the password is one line")
    _master_passwords[path] = password
    return password


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
        self.login = config.backend_login
        self.separator = config.auth_master_separator
        # (name, password) of the proxy's master login at the backends, or None: the user's own credentials
        self.master: tuple[str, str] | None = None
        path = config.backend_master_password_file
        if config.backend_master_user is not None and path is not None:
            password = _master_passwords.get(path)
            self.master = (config.backend_master_user, password if password is not None else read_master_password(path))
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
                await close_stream(writer)
