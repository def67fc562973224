"""Dovecot's ``dovecot-uidlist``: read it, and (``[mail] uidl = "dovecot"``)
give messages their UIDs in it exactly as Dovecot does, under Dovecot's own
lock, so the UIDL of a message never depends on fastpop's index.

Format (Dovecot's src/lib-storage/index/maildir/maildir-uidlist.c), version 3::

    3 V<uidvalidity> N<next uid> G<mailbox guid> [other header fields]
    <uid> [<K><value> ...] :<file base name>

one line per message, UIDs ascending; a record field ``P<uidl>`` is the
message's POP3 UIDL (``P`` alone: its base name), which Dovecot's POP3
serves instead of ``pop3_uidl_format`` (default ``%08Xu%08Xv``: UID and
UIDVALIDITY in 8 lowercase hex digits each).  Version 1 (``1 <uidvalidity>
<next uid>``, lines ``<uid> <name>``) is still read.

Writers take ``dovecot-uidlist.lock`` (created with O_EXCL, holding
``pid:hostname``), write a new file and rename it over the list; a lock
whose process is gone (same host) or that has not changed for two minutes
is stale and taken over, as Dovecot's file-dotlock.c does.  fastpop writes
the new list to a temporary file of an unpredictable name (O_EXCL|O_NOFOLLOW)
and renames it, keeping every record and header field it read, so Dovecot
sees a list it could have written.

The file lies in the user-writable Maildir: it is parsed as hostile input,
bounded in size, opened without following a link; anything malformed raises
``UidlistCorrupt`` (fastpop then refuses to guess a UIDL: see maildir.py).
"""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from collections.abc import Container, Iterator

from fastpop.store import safefs
from fastpop.store.durable import replace_file

UIDLIST = "dovecot-uidlist"
LOCK = UIDLIST + ".lock"
# Bounded: about a million messages' records.  A larger file is refused.
MAX_BYTES = 64 * 1024 * 1024
MAX_UID = 0xFFFFFFFE  # Dovecot: "UID too high" at (uint32_t)-1
STALE_SECONDS = 120  # Dovecot's MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT
PID_CHECK_AFTER = 2  # Dovecot's STALE_PID_CHECK_SECS: a fresh lock's pid is not read yet
# Seconds a writer waits for Dovecot to finish a sync (Dovecot itself waits up to
# 122 s, MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT + 2, in a process of the user's own).
# A login waits this long too, but in the event loop, holding no thread: a lock
# the user planted must not fill the login threads (fastpop.session.login).
LOCK_WAIT = 10.0


class UidlistCorrupt(ValueError):
    """dovecot-uidlist exists but cannot be parsed safely."""


class UidlistLocked(OSError):
    """dovecot-uidlist.lock is held (by a live process) for too long."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EAGAIN, "dovecot-uidlist is locked by another process", path)


def _valid_uidl(text: str) -> bool:
    # RFC 1939: 1-70 characters in 0x21-0x7E
    return 0 < len(text) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in text)


class Uidlist:
    """A parsed dovecot-uidlist: ``validity``, ``next_uid``, the header's
    other fields and the records, by base name: (uid, extension fields)."""

    __slots__ = ("version", "validity", "next_uid", "header_rest", "records")

    def __init__(self, validity: int, next_uid: int, header_rest: str = "", version: int = 3) -> None:
        self.version = version
        self.validity = validity
        self.next_uid = next_uid
        self.header_rest = header_rest  # "G<guid> ...": kept as read
        self.records: dict[str, tuple[int, str]] = {}  # in file order: ascending UIDs

    def uid(self, base: str) -> int | None:
        rec = self.records.get(base)
        return None if rec is None else rec[0]

    def uidl(self, base: str) -> str | None:
        """The UIDL Dovecot's POP3 serves for this message (its default
        format, or the record's P field), or None if it has no UID yet."""
        rec = self.records.get(base)
        if rec is None:
            return None
        uid, ext = rec
        for field in ext.split(" ") if ext else ():
            if field[:1] == "P":
                value = field[1:] or base  # "P" alone: the base name (Dovecot's storage id)
                if _valid_uidl(value):
                    return value
                break  # not one RFC 1939 allows: the default instead
        return f"{uid:08x}{self.validity:08x}"

    def encode(self) -> bytes:
        head = f"3 V{self.validity} N{self.next_uid}"
        if self.header_rest:
            head += " " + self.header_rest
        lines = [head]
        for base, (uid, ext) in self.records.items():
            lines.append(f"{uid} {ext} :{base}" if ext else f"{uid} :{base}")
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _lines(data: bytes) -> Iterator[str]:
    """The lines of ``data`` up to its last newline (after it: nothing, or a
    line Dovecot is still appending in place under its lock, not read yet, as
    Dovecot), decoded a block at a time (safefs.line_blocks: the file is the
    user's, and a list of every line of a 64 MiB file held several hundred MiB)."""
    for block in safefs.line_blocks(data):
        yield from block.decode("utf-8", "surrogateescape").split("\n")


def parse(data: bytes, wanted: Container[str] | None = None) -> Uidlist:
    """A Uidlist from the file's bytes; UidlistCorrupt if it is not one.
    ``wanted``: keep only the records of these base names (the whole file is
    still checked), so what is held grows with them, not with the file."""
    if len(data) > MAX_BYTES:
        raise UidlistCorrupt(f"over {MAX_BYTES} bytes")
    if b"\0" in data:
        raise UidlistCorrupt("NUL byte")
    lines = _lines(data)
    header = next(lines, None)
    if header is None:
        raise UidlistCorrupt("empty")
    if len(header) < 2 or header[1] != " " or header[0] not in "13":
        raise UidlistCorrupt("unsupported version")
    version = int(header[0])
    validity = next_uid = 0
    others: list[str] = []
    if version == 1:
        parts = header[2:].split()
        if len(parts) < 2:
            raise UidlistCorrupt("bad version 1 header")
        validity, next_uid = _number(parts[0], "UIDVALIDITY"), _number(parts[1], "next UID")
    else:
        for field in header[2:].split(" "):
            if not field:
                continue
            key, value = field[0], field[1:]
            if key == "V":
                validity = _number(value, "UIDVALIDITY")
            elif key == "N":
                next_uid = _number(value, "next UID")
            else:
                others.append(field)
    if not (0 < validity <= 0xFFFFFFFF) or not (0 < next_uid <= MAX_UID + 1):
        raise UidlistCorrupt("bad UIDVALIDITY or next UID")
    out = Uidlist(validity, next_uid, " ".join(others), version)
    previous = 0
    for line in lines:
        if version == 3:  # as maildir_uidlist_read_extended: fields up to one starting with ":"
            uid_text, _, rest = line.partition(" ")
            fields = []
            while rest and rest[0] != ":":
                field, _, rest = rest.partition(" ")
                rest = rest.lstrip(" ")
                if field:
                    if not "A" <= field[0] <= "Z":
                        raise UidlistCorrupt("bad record field")
                    fields.append(field)
            if not rest.startswith(":"):
                raise UidlistCorrupt("record without a file name")
            base = rest[1:]
            ext = " ".join(fields)
        else:
            uid_text, _, base = line.partition(" ")
            base = base.split(":", 1)[0]
            ext = ""
        uid = _number(uid_text, "UID")
        if not previous < uid <= MAX_UID:
            raise UidlistCorrupt("UIDs not ascending")
        previous = uid
        if not base or "/" in base or base[0] == "." or len(base.encode("utf-8", "surrogateescape")) > 255:
            raise UidlistCorrupt("bad file name")
        if wanted is not None and base not in wanted:
            continue
        out.records.pop(base, None)  # a duplicate: Dovecot keeps the later one (dicts keep order)
        out.records[base] = (uid, ext)
    if previous >= out.next_uid:
        out.next_uid = previous + 1  # as Dovecot, never reuse a UID seen in a record
    return out


def _number(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 10:
        raise UidlistCorrupt(f"bad {what}")
    return int(text)


def read(dir_fd: int, wanted: Container[str] | None = None) -> Uidlist | None:
    """The Maildir's dovecot-uidlist (``dir_fd``: the Maildir), None if there
    is none; UidlistCorrupt if it is not a regular file or cannot be parsed.
    ``wanted``: only these base names' records are kept (see parse); a list
    read so is never written back."""
    try:
        fd, st = safefs.open_regular(dir_fd, UIDLIST)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EINVAL):
            raise UidlistCorrupt(f"not a readable regular file: {exc.strerror}") from None
        raise
    try:
        if st.st_size > MAX_BYTES:
            raise UidlistCorrupt(f"over {MAX_BYTES} bytes")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_BYTES:
                raise UidlistCorrupt(f"over {MAX_BYTES} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return parse(b"".join(chunks), wanted)


def _lock_owner_gone(dir_fd: int) -> bool:
    """Whether the lock names a process of this host that no longer runs."""
    try:
        fd = os.open(LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        text = os.read(fd, 512).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    pid, _, host = text.partition(":")
    if host != socket.gethostname() or not (pid.isascii() and pid.isdigit()) or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def lock(dir_fd: int, owner: int | None = None, wait: float = LOCK_WAIT) -> tuple[int, int]:
    """Take dovecot-uidlist.lock; returns (descriptor, inode) for unlock().
    Waits up to ``wait`` seconds for a live holder, takes over a stale one,
    raises UidlistLocked after that.

    As Dovecot's own dotlocks, the lock is written under a temporary name
    and then linked into place, so it appears whole and already the mail
    user's: Dovecot's processes (the mail user) read and watch a lock they
    find (inotify needs read permission), and one created in place by root
    was root's until the fchown that followed (Dovecot logged "inotify_add_watch
    ... Permission denied" when it looked in between)."""
    deadline = time.monotonic() + wait
    while True:
        fd, tmp = _lock_file(dir_fd, owner)
        try:
            os.link(tmp, LOCK, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            try:
                st = os.stat(LOCK, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            age = time.time() - st.st_mtime
            if age > STALE_SECONDS or (age > PID_CHECK_AFTER and _lock_owner_gone(dir_fd)):
                try:  # stale: as Dovecot's dotlock_override
                    os.unlink(LOCK, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() > deadline:
                raise UidlistLocked(LOCK) from None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.unlink(tmp, dir_fd=dir_fd)
        return fd, os.fstat(fd).st_ino


def _lock_file(dir_fd: int, owner: int | None) -> tuple[int, str]:
    """A new file holding ``pid:host`` under a name of its own (Dovecot's
    dotlock temporaries' form: hidden, so no listing takes it for a message
    or a folder), the owner's."""
    tmp = f".temp.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:16]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, f"{os.getpid()}:{socket.gethostname()}".encode())
        if owner is not None and owner >= 0 and owner != os.geteuid():
            os.fchown(fd, owner, -1)  # Dovecot, as the mail user, must be able to judge and remove it
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    return fd, tmp


def unlock(dir_fd: int, held: tuple[int, int]) -> None:
    """Remove the lock if it is still ours (not taken over as stale)."""
    fd, ino = held
    os.close(fd)
    try:
        if os.stat(LOCK, dir_fd=dir_fd, follow_symlinks=False).st_ino == ino:
            os.unlink(LOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def write(dir_fd: int, uidlist: Uidlist, owner: int | None = None) -> None:
    """Replace dovecot-uidlist (the caller holds the lock): a new file of an
    unpredictable name, fsync'ed, renamed over it."""
    replace_file(dir_fd, UIDLIST, uidlist.encode(), owner)  # (Dovecot runs as the mail user and appends to it)


def new_validity() -> int:
    """A UIDVALIDITY for a new list: the time, as Dovecot's fallback."""
    return max(1, int(time.time()) & 0xFFFFFFFF)


def _needs_work(current: Uidlist | None, bases: list[str], keep: dict[str, str]) -> bool:
    if current is None:
        return bool(bases)
    for base in bases:
        if base not in current.records:
            return True
        served = keep.get(base)
        if served is not None and served != current.uidl(base):
            return True
    return False


def _with_pop3_uidl(ext: str, uidl: str) -> str:
    fields = [f for f in ext.split(" ") if f and f[0] != "P"]
    fields.append("P" + uidl)
    return " ".join(fields)


def assign(dir_fd: int, bases: list[str], keep: dict[str, str], owner: int | None = None,
           wait: float = LOCK_WAIT) -> Uidlist:
    """Make sure every base name in ``bases`` (in delivery order) has a UID,
    under Dovecot's lock.  ``keep``: UIDLs already served for some of them
    (fastpop's index): a message whose UIDL in the list would differ gets
    ``P<uidl>`` in its record, so it never changes, in fastpop or in
    Dovecot's POP3.  Returns the list as written, or as read if it needed
    nothing (then no lock is taken).  ``wait``: seconds to wait for a live
    lock, then UidlistLocked (a login passes 0: see fastpop.session.login)."""
    try:
        current = read(dir_fd)
    except UidlistCorrupt:
        current = None  # judged again under the lock, where no writer is midway
    if current is not None and not _needs_work(current, bases, keep):
        return current
    held = lock(dir_fd, owner, wait)
    try:
        current = read(dir_fd)  # again, under the lock: Dovecot may have numbered them meanwhile
        if current is None:
            current = Uidlist(new_validity(), 1, "G" + uuid.uuid4().hex)
        if not _needs_work(current, bases, keep):
            return current
        for base in bases:
            served = keep.get(base)
            rec = current.records.get(base)
            if rec is None:
                if current.next_uid > MAX_UID:
                    raise UidlistCorrupt("UIDs exhausted")
                uid = current.next_uid
                current.next_uid += 1
                ext = ""
                if served is not None and served != f"{uid:08x}{current.validity:08x}":
                    ext = "P" + served
                current.records[base] = (uid, ext)
            elif served is not None and served != current.uidl(base):
                current.records[base] = (rec[0], _with_pop3_uidl(rec[1], served))
        write(dir_fd, current, owner)
        return current
    finally:
        unlock(dir_fd, held)
