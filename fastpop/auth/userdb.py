"""User databases: where a user's credentials and user data come from.

One interface, several drivers, chosen with ``[userdb] driver``:

- ``passwd-file`` (the default, this module): a Dovecot passwd-file held in
  memory; lookups are synchronous and cost a dict lookup, so the login path
  of the embedded default stays as cheap as it always was.
- ``postgresql``, ``mysql``, ``sqlite`` (``fastpop.auth.userdb_sql``): a password
  query and an optional user query, as Dovecot's ``password_query`` and
  ``user_query``, through connection pools.
- ``ldap`` (``fastpop.auth.userdb_ldap``): the password attribute, or a bind as
  the user (``auth_bind``).

A lookup answers one ``UserRecord`` (``fastpop.auth.passwd_file``): the stored
``{SCHEME}`` password and the user data (uid, gid, home, and extra fields such
as ``mail``, ``login_delay``, ``apop``, ``plaintext``).  Network drivers are
asynchronous (``is_async``) and never block the event loop: each query has a
timeout, and any failure raises ``AuthUnavailable`` ([SYS/TEMP] for the
client, a log line for the operator).  ``fastpop.auth.cache`` sits in front of
them.
"""

from __future__ import annotations

import functools
import logging

from fastpop.auth.passwd_file import PasswdFile, UserRecord
from fastpop.net import Networks

log = logging.getLogger("fastpop.auth")

DRIVERS = ("passwd-file", "postgresql", "mysql", "sqlite", "ldap")


class UserDB:
    """The interface.  A synchronous driver implements ``lookup``; an
    asynchronous one sets ``is_async`` and implements ``fetch`` (and
    ``bind`` when it checks passwords itself).  Both raise
    ``fastpop.auth.authenticator.AuthUnavailable`` when the database cannot answer."""

    is_async = False
    auth_bind = False  # the database verifies the password (LDAP bind): no hash to compare
    uses_remote_ip = False  # a query depends on the client address (part of the cache key)
    name = "userdb"

    def lookup(self, name: str) -> UserRecord | None:  # pragma: no cover - interface
        raise NotImplementedError

    async def fetch(self, name: str, remote_ip: str | None = None) -> UserRecord | None:
        """Credentials and user data for ``name``; None if there is no such user."""
        return self.lookup(name)

    async def bind(self, name: str, password: str, remote_ip: str | None = None) -> UserRecord | None:
        """auth_bind drivers: the record if the password is right, else None."""
        raise NotImplementedError  # pragma: no cover - interface

    async def close(self) -> None:
        """Release connections (server shutdown)."""


class PasswdFileDB(UserDB):
    """The embedded default: the passwd-file, re-read when it changes."""

    name = "passwd-file"

    def __init__(self, path: str) -> None:
        self.file = PasswdFile(path)

    def lookup(self, name: str) -> UserRecord | None:
        return self.file.lookup(name)

    def watch(self, loop) -> bool:
        """Watch the file on ``loop`` (PasswdFile.watch)."""
        return self.file.watch(loop)

    async def close(self) -> None:
        self.file.unwatch()


def allowed(record: UserRecord, field: str) -> bool:
    """A per-user yes/no extra field (``allow_apop``, ``allow_plaintext``); yes when absent."""
    value = record.extra.get(field) if record.extra else None
    return value is None or value.lower() not in _NO


_NO = ("no", "n", "false", "0", "off")


def flag(record: UserRecord, field: str) -> bool:
    """A per-user flag (``nologin``, ``nopop3``): set when present with no value
    or any value but a "no" (an SQL column ``nologin`` = 'Y', or 0 for unset)."""
    value = record.extra.get(field) if record.extra else None
    return value is not None and value.lower() not in _NO


@functools.lru_cache(maxsize=1024)
def _networks(spec: str) -> Networks | None:
    """Dovecot's allow_nets value (CIDRs or addresses, comma- or space-separated); None if unusable."""
    try:
        return Networks(spec.replace(",", " ").split())
    except ValueError:
        return None


def login_refusal(record: UserRecord, peer: str) -> str | None:
    """Why the user's own fields forbid this login (a reason for the log), or
    None: Dovecot's ``nologin`` and ``allow_nets``, and POP3 turned off for the
    user (``allow_pop3=no``, ``pop3=no`` or ``nopop3``).  ``peer`` is the
    client's address (a PROXY header's, behind a proxy)."""
    if flag(record, "nologin"):
        return "login disabled for the user (nologin)"
    if not allowed(record, "allow_pop3") or not allowed(record, "pop3") or flag(record, "nopop3"):
        return "pop3 disabled for the user"
    spec = record.extra.get("allow_nets") if record.extra else None
    if spec is not None:
        nets = _networks(spec)
        if nets is None:  # a typo must not open the account to every network
            log.warning("unusable allow_nets for user=%s: refusing its logins", record.name)
            return "allow_nets unusable"
        if peer not in nets:
            return "network not allowed for the user (allow_nets)"
    return None


def expand_vars(template: str, name: str, remote_ip: str | None, escape=None) -> tuple[str, list[str]]:
    """Dovecot's variables in a query or filter template.

    Returns the template with every variable replaced by a ``\\0`` marker and
    the values in order; drivers turn markers into their own placeholders
    (never into quoted text, so no value can change a query).  With
    ``escape``, values are escaped and put in the text instead (LDAP
    filters).  ``%u`` (or ``%{user}``) the user, ``%n`` (``%{username}``) the
    local part, ``%d`` (``%{domain}``) the domain, ``%r`` (``%{rip}``) the
    client's address, ``%%`` a percent sign.  A variable written in single
    quotes, as Dovecot queries do (``'%u'``), loses its quotes.
    """
    local, _, domain = name.partition("@")
    values = {"u": name, "user": name, "n": local, "username": local, "d": domain, "domain": domain,
              "r": remote_ip or "", "rip": remote_ip or ""}
    out: list[str] = []
    params: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        c = template[i]
        if c != "%" or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        if template[i + 1] == "%":
            out.append("%")
            i += 2
            continue
        if template[i + 1] == "{":
            close = template.find("}", i + 2)
            key = template[i + 2 : close] if close > 0 else ""
            end = close + 1
        else:
            key = template[i + 1]
            end = i + 2
        if key not in values:
            raise ValueError(f"unknown variable in {template!r} at {template[i:end] or template[i:]!r}")
        quoted = out and out[-1] == "'" and template[end : end + 1] == "'"
        if escape is not None:
            out.append(escape(values[key]))
        else:
            if quoted:
                out.pop()
                end += 1
            out.append("\0")
            params.append(values[key])
        i = end
    return "".join(out), params


def uses_remote_ip(*templates: str | None) -> bool:
    return any(t and ("%r" in t or "%{rip}" in t) for t in templates)


def record_from_row(name: str, row: dict, password: bool = True) -> UserRecord:
    """A query's row (column -> value) as a record, Dovecot's way: ``password``,
    ``user`` (the canonical name), ``uid``, ``gid``, ``home``; a ``userdb_``
    prefix is dropped; every other non-NULL column is an extra field."""
    fields: dict[str, str] = {}
    for key, value in row.items():
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode("utf-8", "replace")
        key = key.lower()
        if key.startswith("userdb_"):
            key = key[len("userdb_") :]
        fields[key] = str(value)
    stored = fields.pop("password", "")
    if not password:  # the database checks passwords itself (LDAP bind): none to keep
        stored = ""
    user = fields.pop("user", None) or fields.pop("username", None) or name
    uid, gid = fields.pop("uid", None), fields.pop("gid", None)
    home = fields.pop("home", None) or None
    return UserRecord(
        name=user,
        password=stored,
        uid=int(uid) if uid and uid.lstrip("-").isdigit() else None,
        gid=int(gid) if gid and gid.lstrip("-").isdigit() else None,
        home=home,
        extra=fields,
    )
