"""RETR and TOP beyond the common case: finding a renamed message file,
checking one is what was indexed, and choosing how it goes out (one write
for a small message, sendfile(2), or a streamed transform:
fastpop.session.sending).  The commands themselves, and a small message of
the indexed size, are the compiled core's (SessionCore.cmd_retr, _send);
it hands everything else to ``_send_message`` here, and the LIST or UIDL
of a very large mailbox to ``_list_in_thread``.

``Retrieval`` is a part of ``POP3Protocol`` (fastpop.session.protocol): it
holds no state of its own; the session's slots do.  ``_count_sent`` is a
hook (the counting session adds the bytes to its metrics).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
from collections.abc import Callable
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

from fastpop.session.pools import counting_pool, listing_pool
from fastpop.session.sending import (
    NO_NULS,
    SMALL_MESSAGE,
    has_nul,
    may_sendfile,
    open_stream,
    render_small,
    workaround_flags,
)
from fastpop.session.state import (
    BUSY_CLOSING,
    BUSY_COUNTING,
    BUSY_FORMATTING,
    BUSY_LISTING,
    BUSY_SCANNING,
    BUSY_SENDING,
    SessionParts,
)
from fastpop.store.maildir import is_permanent
from fastpop.wire import responses as R
from fastpop.wire.stuffing import pop3_size, pop3_size_of

log = logging.getLogger("fastpop.session")

# A session lists cur/ for renamed messages at most once per this many seconds
RELIST_INTERVAL = 1.0
# _open()'s answers other than a descriptor
ANSWERED, LISTING = -1, -2


class Retrieval(SessionParts):
    """The TRANSACTION state's RETR and TOP (a part of POP3Protocol)."""

    if not TYPE_CHECKING:  # slots at run time (no __dict__ per session); the checker reads the declarations
        __slots__ = ()

    def cmd_last(self, args: tuple[str, ...]) -> None:
        """RFC 1460's LAST, for old clients ([pop3] last): the highest message
        number RETR sent in this session since login or RSET (TOP does not
        count, as in Dovecot's pop3_enable_last).  Off, it is not a command."""
        if not self._ctx.config.pop3_last:
            return self._bad(R.ERR_UNKNOWN)
        if self._mailbox is None:
            return self._bad(R.ERR_WRONG_STATE)
        if args:
            return self._bad(R.ERR_ARGS)
        self._out.append(b"+OK %d\r\n" % self._last_retr)

    def _send_message(self, index: int, top_lines: int | None) -> None:
        fd = self._open(index, top_lines)
        if fd >= 0:
            self._send_file(index, top_lines, fd)

    def _open(self, index: int, top_lines: int | None) -> int:
        """A descriptor of message ``index``'s file; ANSWERED (-ERR queued), or
        LISTING (cur/ is being listed: the command goes on in _relisted)."""
        mailbox = self._mailbox
        assert mailbox is not None
        path = mailbox.file_path(index)
        try:
            return mailbox.open_message(path)
        except FileNotFoundError:
            return self._open_renamed(index, top_lines)
        except OSError as exc:
            self._unreadable("open", path, exc)
            return ANSWERED

    def _send_file(self, index: int, top_lines: int | None, fd: int) -> None:
        """Send message ``index`` (RETR; TOP with ``top_lines``) from its open file ``fd``."""
        mailbox = self._mailbox
        assert mailbox is not None
        path, pop3_size, size = mailbox.message_file(index)
        indexed_size = size
        try:
            # The index knows the file's size: a small message is one read,
            # no fstat.  A file whose size is not what was indexed (changed
            # since, which Maildir files never should) is judged as it is now.
            small = size <= SMALL_MESSAGE
            if small:
                data = os.read(fd, size + 1)  # +1: see a file that grew
            if not small or len(data) != size:
                st = os.fstat(fd)
                if not S_ISREG(st.st_mode):  # a FIFO or directory put in its place since
                    raise OSError(errno.EINVAL, "not a regular file", path)
                size = st.st_size
                small = size <= SMALL_MESSAGE
                os.lseek(fd, 0, os.SEEK_SET)
                if small:
                    data = os.read(fd, size + 1)  # +1: read to EOF even if the file grew
        except OSError as exc:
            os.close(fd)
            return self._unreadable("read", path, exc)
        if top_lines is None and (small and len(data) != indexed_size or not small and size != indexed_size):
            # Sent as it is now, so the octet count must be of what is sent, not LIST's
            if not small:
                # counted by reading the whole file, which its user can make as large as
                # the file system allows (a sparse file costs no disk): not in the event loop
                return self._count_changed(index, fd, path, indexed_size, size)
            pop3_size = self._changed_size(fd, path, data, indexed_size, size)
            if pop3_size < 0:
                return
        self._send_opened(index, top_lines, fd, path, pop3_size, size, indexed_size, data if small else None)

    def _send_opened(self, index: int, top_lines: int | None, fd: int, path: str, pop3_size: int, size: int,
                     indexed_size: int, data: bytes | None, nul_free: bool | None = None) -> None:
        """The rest of _send_file, once the octet count is known: ``data``, the
        whole file of a small message (else None: it is streamed).  ``nul_free``:
        whether the file holds no NUL, once looked for (outlook-no-nuls)."""
        mailbox = self._mailbox
        assert mailbox is not None
        status = R.OK_TOP if top_lines is not None else b"+OK %d octets\r\n" % pop3_size
        names = self._ctx.config.client_workarounds
        workarounds = workaround_flags(names) if names else 0  # (none by default: nothing more to do)
        if data is not None:
            os.close(fd)
            body = render_small(data, top_lines, workarounds)
            self._out += (status, body, R.END)
            self._out_size += len(body)
            self._count_sent(top_lines is not None, len(body))  # (metrics override it)
            return
        stored_as_sent = size == pop3_size and self._can_sendfile()
        if workarounds & NO_NULS and nul_free is None and may_sendfile(size, top_lines, stored_as_sent):
            return self._scan_for_nuls(index, fd, path, pop3_size, size, indexed_size)
        try:
            stream = open_stream(
                # POP3Protocol, whose transport is set for as long as a stream runs (the checker sees Optional)
                self, fd, size, top_lines, stored_as_sent,  # type: ignore[arg-type]
                # what the index knows of dot lines holds for the file it measured, not one changed since
                size == indexed_size and mailbox.no_dot_lines(index), workarounds, bool(nul_free),
            )
        except (OSError, ValueError) as exc:
            os.close(fd)
            return self._unreadable("read", path, exc)
        self._out.append(status)
        self._flush()
        self._stream = stream
        self._stream_is_top = top_lines is not None
        self._busy |= BUSY_SENDING
        stream.pump()

    # A message renamed since the session knew its name (an IMAP client's flag,
    # or the user) is found by listing cur/, which the user can fill (tens of
    # thousands of hidden entries: tens of milliseconds each time).  So the
    # listing runs in a thread while the command pull waits (BUSY_LISTING:
    # pipelined commands stay in order), one listing serves every renamed
    # message of the session, and a session lists cur/ at most once per
    # RELIST_INTERVAL (a message renamed again since waits for the next one).

    def _open_renamed(self, index: int, top_lines: int | None) -> int:
        """_open() of a message not found under its known name."""
        mailbox = self._mailbox
        assert mailbox is not None
        while True:
            path = mailbox.listed_path(index)
            if path is None:  # no listing yet, or one from before this rename
                self._relist(index, top_lines)
                return LISTING
            if not path:
                log.warning("message vanished user=%s file=%s", self._user_of_mailbox(), mailbox.file_path(index))
                self._out.append(R.ERR_MESSAGE_GONE)
                return ANSWERED
            try:
                return mailbox.open_message(path)
            except FileNotFoundError:
                continue  # renamed again since the listing: listed_path asks for a new one
            except OSError as exc:
                self._unreadable("open", path, exc)
                return ANSWERED

    def _relist(self, index: int, top_lines: int | None) -> None:
        """Stop the command pull and list cur/ in a thread, no sooner than
        RELIST_INTERVAL after the session's last listing began."""
        mailbox = self._mailbox
        assert mailbox is not None
        self._busy |= BUSY_LISTING  # (set already when a listing showed the message's old name)
        wait = RELIST_INTERVAL - mailbox.listing_age()
        if wait > 0:
            self.loop.call_later(wait, self._start_listing, index, top_lines)
        else:
            self._start_listing(index, top_lines)

    def _start_listing(self, index: int, top_lines: int | None) -> None:
        mailbox = self._mailbox
        if self.transport is None or self._busy & BUSY_CLOSING or mailbox is None:
            return  # the client left (or the session timed out) meanwhile
        future = self.loop.run_in_executor(listing_pool(), mailbox.list_cur)
        future.add_done_callback(functools.partial(self._relisted, index, top_lines))

    def _relisted(self, index: int, top_lines: int | None, future: asyncio.Future) -> None:
        """The listing is in: the command goes on, with the known name first
        (a file renamed back is there again), then the listing's."""
        if self.transport is None or self._busy & BUSY_CLOSING:
            return
        mailbox = self._mailbox
        assert mailbox is not None
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is None:
            listed = future.result()
            mailbox.use_listing(listed)
            log.debug("listed cur/ for renamed messages user=%s names=%d", self._user_of_mailbox(), len(listed[1]))
            fd = self._open(index, top_lines)
            if fd == LISTING:
                return  # renamed again since this listing began: the next one answers
            if fd >= 0:
                self._send_file(index, top_lines, fd)  # (a stream keeps the pull stopped: BUSY_SENDING)
        elif isinstance(exc, FileNotFoundError):  # the whole Maildir removed by another program
            log.warning("message vanished user=%s file=%s", self._user_of_mailbox(), mailbox.file_path(index))
            self._out.append(R.ERR_MESSAGE_GONE)
        else:
            self._unreadable("find", mailbox.file_path(index), exc)
        self._flush()
        self._unbusy(BUSY_LISTING)

    def _list_in_thread(self, job: Callable[[bytearray], bytes], status: bytes) -> None:
        """LIST or UIDL of a mailbox of more than LISTING_IN_LOOP_MOST messages
        (the core's cmd_list, cmd_uidl): formatted (``job``) in a thread while the
        command pull waits, so pipelined commands stay in order.  Its user can
        plant an index naming millions of made-up messages (a valid one, naming
        cur/'s mtime, is served as it is): formatted in the event loop, 4,000,000
        of them held every other session of the worker 150 ms at each LIST or UIDL."""
        deleted = self._deleted
        assert deleted is not None
        self._busy |= BUSY_FORMATTING
        future = self.loop.run_in_executor(counting_pool(), job, deleted)
        future.add_done_callback(functools.partial(self._listed, status))

    def _listed(self, status: bytes, future: asyncio.Future) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING:
            return  # the client left (or the session timed out) meanwhile
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        self._flush()
        if exc is None:
            lines = future.result()
            # (written apart: joined with the status line, tens of MB were copied in the event loop)
            self.transport.write(status)
            self.transport.write(lines)
            self.transport.write(R.END)
        else:
            log.error("cannot list the mailbox user=%s: %r", self._user_of_mailbox(), exc)
            self.transport.write(R.ERR_MAILBOX_TEMP)
        self._unbusy(BUSY_FORMATTING)

    def _read_in_thread(self, busy: int, fd: int, path: str, job: Callable[[], object],
                        then: Callable[[Any], None]) -> None:
        """Run ``job``, which reads the open message file ``fd`` (as large as its
        user made it), in a thread of the counting pool while the command pull
        waits (``busy``: pipelined commands stay in order), then ``then`` with
        its result in the event loop.  The file is closed if the session ended
        meanwhile, or the read failed (-ERR)."""
        self._busy |= busy
        future = self.loop.run_in_executor(counting_pool(), job)
        future.add_done_callback(functools.partial(self._read_done, busy, fd, path, then))

    def _read_done(self, busy: int, fd: int, path: str, then: Callable[[Any], None],
                   future: asyncio.Future) -> None:
        if self.transport is None or self._busy & BUSY_CLOSING or self._mailbox is None:
            os.close(fd)  # the client left (or the session timed out) meanwhile
            return
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            os.close(fd)
            self._unreadable("read", path, exc)
        else:
            then(future.result())
        self._flush()
        self._unbusy(busy)  # (a stream keeps the pull stopped: BUSY_SENDING; the other reason may still hold)

    def _count_changed(self, index: int, fd: int, path: str, indexed_size: int, size: int) -> None:
        """RETR of a large message whose size is not the indexed one: its octet
        count is read in a thread (BUSY_COUNTING)."""
        self._read_in_thread(BUSY_COUNTING, fd, path, functools.partial(pop3_size, fd),
                             functools.partial(self._changed_counted, index, fd, path, indexed_size, size))

    def _changed_counted(self, index: int, fd: int, path: str, indexed_size: int, size: int, counted: int) -> None:
        log.warning("message changed since it was indexed user=%s file=%s indexed_size=%d size=%d",
                    self._user_of_mailbox(), path, indexed_size, size)
        self._send_opened(index, None, fd, path, counted, size, indexed_size, None)

    def _scan_for_nuls(self, index: int, fd: int, path: str, pop3_size: int, size: int, indexed_size: int) -> None:
        """outlook-no-nuls: whether a large message holds a NUL decides between
        sendfile and the transform, and is read in a thread (BUSY_SCANNING; after
        _count_changed, whose BUSY_COUNTING is cleared while this one holds)."""
        self._read_in_thread(BUSY_SCANNING, fd, path, functools.partial(has_nul, fd, size),
                             functools.partial(self._nuls_scanned, index, fd, path, pop3_size, size, indexed_size))

    def _nuls_scanned(self, index: int, fd: int, path: str, pop3_size: int, size: int, indexed_size: int,
                      found: bool) -> None:
        self._send_opened(index, None, fd, path, pop3_size, size, indexed_size, None, not found)

    def _changed_size(self, fd: int, path: str, data: bytes | None, indexed_size: int, size: int) -> int:
        """The RETR size of a message file whose size is no longer the indexed one; -1 (fd
        closed, -ERR queued) if it cannot be read."""
        try:
            sent = pop3_size_of(data) if data is not None else pop3_size(fd)  # (the file being sent)
        except OSError as exc:
            os.close(fd)
            self._unreadable("read", path, exc)
            return -1
        log.warning("message changed since it was indexed user=%s file=%s indexed_size=%d size=%d",
                    self._user_of_mailbox(), path, indexed_size, size)
        return sent

    def _user_of_mailbox(self) -> str:
        """The name of the user whose mailbox is open (for the logs)."""
        user = self._user
        assert user is not None, "a mailbox is open only once a user logged in"
        return user.name

    def _unreadable(self, what: str, path: str, exc: BaseException) -> None:
        """A message that cannot be opened or read: logged, and [SYS/PERM] when only an
        administrator can mend it (permissions), as at login; else [SYS/TEMP]."""
        log.error("cannot %s message user=%s file=%s: %s", what, self._user_of_mailbox(), path, exc)
        self._out.append(R.ERR_MESSAGE_PERM if is_permanent(exc) else R.ERR_MESSAGE_TEMP)

    def _can_sendfile(self) -> bool:
        """sendfile(2) needs the plain socket: not through TLS, not when disabled."""
        transport = self.transport
        return (
            self._ctx.config.sendfile
            and transport is not None
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
        )

    def _count_sent(self, is_top: bool, size: int) -> None:
        if is_top:
            self._top_count += 1
            self._top_bytes += size
        else:
            self._retr_count += 1
            self._retr_bytes += size

    def stream_done(self, sent: int) -> None:
        """Called by MessageStream when the last byte has been queued."""
        self._stream = None
        self._count_sent(self._stream_is_top, sent)
        self._unbusy(BUSY_SENDING)

    def abort_stream(self) -> None:
        """Called by MessageStream when it cannot finish: the session cannot go on."""
        self._stream = None
        self._end_reason = "read error"
        if self.transport is not None:
            self.transport.abort()
