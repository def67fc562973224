"""What a session needs from the server that runs it.

``fastpop.serve.server.ServerContext`` is the implementation; sessions
(fastpop.session.protocol, fastpop.session.proxied, fastpop.session.metered) see only this
interface, so the session layer imports nothing from the serving layer
above it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from fastpop.auth.authenticator import Authenticator
from fastpop.auth.penalty import LastLogins, PenaltyBox
from fastpop.auth.sasl import Mechanism
from fastpop.config import Config
from fastpop.limits import ConnectionTable
from fastpop.net import Networks
from fastpop.session.tls import TLSManager
from fastpop.store.locking import LockTable, SymlinkLocks


class SessionContext(Protocol):
    """The state every session of one server shares."""

    config: Config
    loop: asyncio.AbstractEventLoop
    auth: Authenticator
    sessions: set[Any]  # the open sessions (fastpop.session.protocol.POP3Protocol)
    connections: ConnectionTable
    mailbox_locks: LockTable | SymlinkLocks
    tls: TLSManager | None
    trusted: Networks  # plaintext logins without TLS, no penalties
    cap_exempt: Networks  # no per-address connection cap (penalties still)
    masters: Authenticator | None  # the master users' passwd-file, None when off
    penalty: PenaltyBox
    last_logins: LastLogins  # LOGIN-DELAY
    apop: bool  # greetings carry an APOP timestamp
    secret: bytes  # the server's persistent secret (fake SCRAM salts)
    oauth_validator: Callable[..., Any] | None
    mechanisms: dict[str, Mechanism]  # SASL, as offered
    capa_transaction: bytes  # the CAPA reply after login
    metrics: Any  # a fastpop.session.metered.Counters when metrics are on, else None
    proxy_servers: list[Any]  # the PROXY listeners (fastpop.session.proxied)
    maintenance: bool  # fastpop maintenance on: logins refused with [SYS/TEMP]
    denied: frozenset[str]  # fastpop deny: these users' logins fail

    def capa_for(self, stls: bool, plaintext_ok: bool) -> bytes: ...
    def auth_list(self, plaintext_ok: bool) -> bytes: ...
    def log_full(self, reason: str) -> None: ...
    def session_class(self, base: type) -> type: ...
    def new_timestamp(self) -> str: ...
