"""LDAP user database (ldap3), as Dovecot's LDAP passdb/userdb.

Two ways to check a password:

- fetch the password attribute (``password_attr``, a ``{SCHEME}`` string as
  in a passwd-file: ``{SSHA}``, ``{CRYPT}$6$...``) with the search account,
  and verify it here (APOP and SCRAM work when it is clear text);
- ``auth_bind``: bind as the user with the password given (the directory
  decides; its password policy applies).  The DN comes from a search, or
  from ``bind_dn_template`` without one.

User data comes from the same search: ``attrs`` maps record fields to
attributes (``home=homeDirectory``, ``mail=mailMessageStore``, ...).  Filter
values are escaped (RFC 4515), DN values too (RFC 4514).  TLS: ``ldaps://``
URIs, or ``starttls``; the certificate is always verified (``tls_ca_file``,
else the system's CAs).

ldap3 is synchronous: calls run in a pool of ``pool_max`` threads, each with
its own search and bind connections, under ``query_timeout``; failures raise
AuthUnavailable as the SQL drivers do (one log line, fail fast for
``retry_interval``, reconnect afterwards).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import ssl
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from fastpop.auth.passwd_file import UserRecord
from fastpop.auth.userdb import UserDB, expand_vars, record_from_row, uses_remote_ip
from fastpop.errors import AuthUnavailable

if TYPE_CHECKING:
    import ldap3

    from fastpop.config import Config

log = logging.getLogger("fastpop.auth")


def escape_filter(value: str) -> str:
    """RFC 4515: a value inside a search filter."""
    out = []
    for c in value:
        if c in "\\*()\0":
            out.append(f"\\{ord(c):02x}")
        else:
            out.append(c)
    return "".join(out)


def escape_dn(value: str) -> str:
    """RFC 4514: a value inside a DN."""
    out = []
    for i, c in enumerate(value):
        if c in ',+"\\<>;=' or (c == "#" and i == 0) or (c == " " and i in (0, len(value) - 1)):
            out.append("\\" + c)
        elif c == "\0":
            out.append("\\00")
        else:
            out.append(c)
    return "".join(out)


class _Refused(Exception):
    """The directory refused the search account's bind: a configuration error."""


class LDAPUserDB(UserDB):
    is_async = True
    name = "ldap"

    def __init__(self, config: Config) -> None:
        self.uris = list(config.ldap_uri)
        self.starttls = config.ldap_starttls
        self.ca_file = config.ldap_tls_ca_file
        self.bind_dn = config.ldap_bind_dn
        self.bind_password = config.ldap_bind_password
        self.base = config.ldap_base
        self.filter = config.ldap_filter
        self.auth_bind = config.ldap_auth_bind
        self.dn_template = config.ldap_bind_dn_template or None
        self.password_attr = config.ldap_password_attr
        self.attrs = dict(item.split("=", 1) for item in config.ldap_attrs)
        self.uses_remote_ip = uses_remote_ip(self.filter, self.dn_template)
        self.connect_timeout = config.userdb_connect_timeout
        self.timeout = config.userdb_query_timeout
        self.retry_interval = config.userdb_retry_interval
        self.threads = config.userdb_pool_max
        self._servers: list[ldap3.Server] | None = None
        self._local = threading.local()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._down = False
        self._down_until = 0.0

    # ------------------------------------------------------------ in a thread

    def _server_list(self):
        import ldap3

        if self._servers is None:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file)
            servers = []
            for uri in self.uris:
                url = urllib.parse.urlsplit(uri)
                secure = url.scheme == "ldaps"
                servers.append(ldap3.Server(url.hostname or "localhost", port=url.port or (636 if secure else 389),
                                            use_ssl=secure, tls=tls, get_info=ldap3.NONE,
                                            connect_timeout=self.connect_timeout))
            self._servers = servers
        return self._servers

    def _connection(self, slot: str, user: str | None, password: str | None):
        import ldap3

        conn = getattr(self._local, slot, None)
        if conn is not None and not conn.closed:
            return conn
        # the first server that answers, in the order given (ldap3's ServerPool
        # sleeps between rounds when all are down: a login must not wait for that)
        error: Exception | None = None
        for server in self._server_list():
            conn = ldap3.Connection(server, user=user, password=password, read_only=True,
                                    receive_timeout=max(1, math.ceil(self.timeout)), raise_exceptions=False,
                                    auto_bind=ldap3.AUTO_BIND_NONE)
            try:
                conn.open()
                break
            except Exception as exc:
                error = exc
        else:
            self._servers = None  # ldap3 remembers failed addresses for a while: start afresh next time
            raise error or OSError("no ldap uri")
        if self.starttls and not conn.server.ssl:
            if not conn.start_tls():
                conn.unbind()
                raise OSError(f"StartTLS refused: {conn.result.get('description') if conn.result else '?'}")
        setattr(self._local, slot, conn)
        return conn

    def _drop(self, slot: str) -> None:
        conn = getattr(self._local, slot, None)
        setattr(self._local, slot, None)
        if conn is not None:
            try:
                conn.unbind()
            except Exception:
                pass

    def _search(self, name: str, remote_ip: str | None) -> tuple[str, dict[str, Any]] | None:
        """(dn, row) of the one entry the filter finds; None if none (or several).
        A kept connection may have died with a server restart: tried twice."""
        try:
            return self._search_once(name, remote_ip)
        except _Refused:
            raise
        except Exception:
            return self._search_once(name, remote_ip)

    def _search_once(self, name: str, remote_ip: str | None) -> tuple[str, dict[str, Any]] | None:
        import ldap3

        attrs = list(self.attrs.values())
        if not self.auth_bind:
            attrs.append(self.password_attr)
        flt = expand_vars(self.filter, name, remote_ip, escape_filter)[0]
        try:
            conn = self._connection("search", self.bind_dn, self.bind_password)
            if not conn.bound and not conn.bind():
                self._drop("search")
                raise _Refused(f"bind as {self.bind_dn or 'anonymous'} refused: {conn.result.get('description')}")
            conn.search(self.base, flt, ldap3.SUBTREE, attributes=attrs, size_limit=2,
                        time_limit=max(1, int(self.timeout)))
        except _Refused:
            raise
        except Exception:
            self._drop("search")
            raise
        result = conn.result or {}
        if result.get("result") not in (0, 4):  # success, or sizeLimitExceeded (two matches)
            self._drop("search")
            raise OSError(f"search failed: {result.get('description')} {result.get('message') or ''}".strip())
        entries = [e for e in (conn.response or []) if e.get("type") == "searchResEntry"]
        if not entries:
            return None
        if len(entries) > 1:
            log.warning("ldap filter %s matches more than one entry: no login", flt)
            return None
        raw = {k.lower(): v for k, v in entries[0]["raw_attributes"].items()}
        row: dict[str, Any] = {}
        for field, attr in self.attrs.items():
            values = raw.get(attr.lower())
            if values:
                row[field] = values[0]
        if not self.auth_bind:
            values = raw.get(self.password_attr.lower())
            row["password"] = values[0] if values else None
        return entries[0]["dn"], row

    def _fetch_sync(self, name: str, remote_ip: str | None) -> UserRecord | None:
        if self.base is None:  # bind_dn_template and no search base: a bind says it all
            return UserRecord(name, "")
        found = self._search(name, remote_ip)
        if found is None:
            return None
        return record_from_row(name, found[1], password=not self.auth_bind)

    def _bind_sync(self, name: str, password: str, remote_ip: str | None) -> UserRecord | None:
        if not password:
            return None  # an empty password is an anonymous bind: it would always "succeed"
        row: dict[str, Any] = {}
        if self.dn_template:
            dn = expand_vars(self.dn_template, name, remote_ip, escape_dn)[0]
            if self.base is not None:
                found = self._search(name, remote_ip)
                if found is None:
                    return None
                row = found[1]
        else:
            found = self._search(name, remote_ip)
            if found is None:
                return None
            dn, row = found
        for attempt in (1, 2):  # a kept connection may have died with a server restart
            try:
                conn = self._connection("bind", None, None)
                ok = conn.rebind(user=dn, password=password)
                break
            except Exception as exc:
                import ldap3.core.exceptions as lexc

                self._drop("bind")
                if isinstance(exc, lexc.LDAPBindError) and "invalidCredentials" in str(exc):
                    return None
                if attempt == 2:
                    raise
        if not ok:
            code = (conn.result or {}).get("result")
            self._drop("bind")  # the connection is now anonymous or unbound: start again next time
            if code in (49, 50, 53):  # invalidCredentials, insufficientAccessRights, unwillingToPerform
                return None
            raise OSError(f"bind failed: {(conn.result or {}).get('description')}")
        return record_from_row(name, row, password=False)

    # ------------------------------------------------------------ on the loop

    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        if self._down and loop.time() < self._down_until:
            raise AuthUnavailable("ldap user database unavailable (retrying shortly)")
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="fastpop-ldap")
        try:
            result = await asyncio.wait_for(loop.run_in_executor(self._executor, fn, *args), self.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            log.error("ldap user database unavailable: %s", reason)
            self._down = True
            self._down_until = loop.time() + self.retry_interval
            raise AuthUnavailable(reason) from None
        if self._down:
            self._down = False
            log.info("ldap user database available again")
        return result

    async def fetch(self, name: str, remote_ip: str | None = None) -> UserRecord | None:
        return await self._call(self._fetch_sync, name, remote_ip)

    async def bind(self, name: str, password: str, remote_ip: str | None = None) -> UserRecord | None:
        return await self._call(self._bind_sync, name, password, remote_ip)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
