"""What the parts of a session share: its states, the reasons its command
pull is suspended, and (for the type checker) the fields and methods that
``POP3Protocol`` (fastpop.session.protocol) gives ``Login`` and ``Retrieval``."""

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

Handler = Callable[[Any, tuple[str, ...]], None]  # a command's entry in a dispatch table


class SessionParts:
    """The base of the session's parts.  Empty at run time; for the type
    checker it declares what POP3Protocol's slots and methods provide."""

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

        @property
        def writing_paused(self) -> bool: ...
        def touch(self) -> None: ...
        def _bad(self, reply: bytes) -> None: ...
        def _message_index(self, arg: str) -> int: ...
        def _flush(self) -> None: ...
        def _unbusy(self, flag: int) -> None: ...
        def _close(self, reason: str) -> None: ...
        def _rearm_timer(self) -> None: ...
        def _on_logged_in(self) -> None: ...
        def _on_login_refused(self, kind: str) -> None: ...
        def _count_sent(self, is_top: bool, size: int) -> None: ...
