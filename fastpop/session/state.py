"""What the parts of a session share: its states, the reasons its command
pull is suspended, the bounds of its reply buffer, and (for the type
checker) the fields and methods that ``SessionCore`` (fastpop.session._core,
the base of ``POP3Protocol``) gives ``Login`` and ``Retrieval``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from fastpop.auth import sasl
    from fastpop.auth.passwd_file import UserRecord
    from fastpop.session.context import SessionContext
    from fastpop.session.sending import MessageStream, SendfileStream
    from fastpop.store.locking import MailboxLock, TableLock
    from fastpop.store.maildir import Mailbox
    from fastpop.wire.parser import CommandParser

AUTHORIZATION, TRANSACTION, UPDATE, CLOSED = range(4)

# Reasons the command pull is suspended (bit flags).
BUSY_AUTH = 1  # a login is being checked
BUSY_SENDING = 2  # a message is streaming out
BUSY_WRITE_PAUSED = 4  # the transport's write buffer is full
BUSY_CLOSING = 8  # the connection is ending
BUSY_TLS = 16  # the STLS handshake is running
BUSY_YIELD = 32  # a burst of pipelined commands gives other sessions a turn
BUSY_LISTING = 64  # cur/ is listed in a thread for a message renamed under RETR/TOP
BUSY_UPDATING = 128  # QUIT's deletions (and flags) are applied in a thread
BUSY_COUNTING = 256  # RETR counts, in a thread, the octets of a large message changed since indexed
BUSY_SCANNING = 512  # RETR looks, in a thread, for a NUL in a large message (outlook-no-nuls)
BUSY_FORMATTING = 1024  # LIST or UIDL of a large mailbox is formatted in a thread

# Replies of pipelined commands are gathered and written together, but every
# reply counts: once FLUSH_BYTES octets of messages and listings, or
# FLUSH_REPLIES pieces of replies of any kind (a status line, a body, a
# terminator), are gathered, they are written out and the pull waits: for the
# client to read if the transport's buffer passed its high-water mark (64 KiB:
# pause_writing, and reading is paused too), else for the next loop iteration.
# 20,000 pipelined "RETR 1" must not build gigabytes of replies, nor 50,000
# pipelined "CAPA" (6 octets each, 186 back) megabytes, nor hold the event
# loop.  A piece that is not a message or a listing is short (CAPA, the
# longest, is under 300 octets), so counting pieces bounds them without
# measuring each: under 150 KiB between two writes.  (A batch of 100
# pipelined commands still gets its replies in one write.)
FLUSH_BYTES = 256 * 1024
FLUSH_REPLIES = 512
# Before login a session may last this many idle timeouts in all (180 s by
# default, Dovecot's pre-login limit), however often it sends a line: the idle
# timeout alone let a CAPA every 59 s keep a connection that never logs in.
PRELOGIN_TIMEOUTS = 3
MAX_TOP_LINES = 2**31 - 1  # TOP's line count, clamped (a C int in the compiled transform)

Handler = Callable[[Any, tuple[str, ...]], None]  # a command's entry in a dispatch table


class SessionParts:
    """The base of the session's parts.  Empty at run time; for the type
    checker it declares what SessionCore's fields and methods provide."""

    if not TYPE_CHECKING:  # slots at run time (no __dict__ per session); the checker reads the declarations
        __slots__ = ()

    if TYPE_CHECKING:
        _authorization_table: ClassVar[tuple[Handler, ...]]
        _transaction_table: ClassVar[tuple[Handler, ...]]
        _ctx: SessionContext
        loop: asyncio.AbstractEventLoop
        transport: asyncio.Transport | None
        _parser: CommandParser
        _state: int
        _table: tuple[Handler, ...]
        _out: list[bytes]
        _out_size: int
        _busy: int
        _in_process: bool
        _reading_paused: bool
        _last_activity: float
        _timer: asyncio.TimerHandle | None
        _timestamp: str
        _peer: str
        _user_name: str | None
        _user: UserRecord | None
        _auth_failures: int
        _bad_commands: int
        _lock: MailboxLock | TableLock | None
        _mailbox: Mailbox | None
        _deleted: bytearray | None
        _deleted_count: int
        _deleted_size: int
        _stream: MessageStream | SendfileStream | None
        _stream_is_top: bool
        _top_count: int
        _top_bytes: int
        _retr_count: int
        _retr_bytes: int
        _end_reason: str
        _implicit_tls: bool
        _secure: bool
        _trusted: bool
        _addr_key: str
        _counted: bool
        _tls_task: asyncio.Task | None
        _auth: sasl.Step | None
        _auth_wants_line: bool
        _auth_started: float
        _auth_failure: sasl.Outcome | None
        _auth_mech: str
        _last_retr: int
        _since: float
        _cap_exempt: bool
        _master: str | None
        _proxy_master: bool

        @property
        def writing_paused(self) -> bool: ...
        def touch(self) -> None: ...
        def _bad(self, reply: bytes) -> None: ...
        def _message_index(self, arg: str) -> int: ...
        def _flush(self) -> None: ...
        def _unbusy(self, flag: int) -> None: ...
        def _close(self, reason: str) -> None: ...
        def _run_auth(self, exchange: sasl.Step) -> None: ...
        def _auth_step(self, value: Any, exc: BaseException | None) -> None: ...
        def _auth_finished(self, outcome: sasl.Outcome) -> None: ...
        def _enter_transaction(self, user: UserRecord, lock: MailboxLock | TableLock, mailbox: Mailbox) -> None: ...
        def _finish_login(self, reply: bytes, refused: str = "") -> None: ...
        def _on_logged_in(self) -> None: ...
        def _on_login_refused(self, kind: str) -> None: ...
        def _count_sent(self, is_top: bool, size: int) -> None: ...
