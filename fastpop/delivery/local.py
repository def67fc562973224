"""Storing one message into a Maildir: the one place mail gets in.

``fastpop deliver`` (an LDA), the LMTP listener and ``fastpop import legacy``
all end here.  A message is stored the way RETR wants to send it: line ends
normalised to CRLF (a bare CR stays an ordinary octet, as in
``fastpop.wire.stuffing``), a final CRLF appended when missing, so the file's size
is its POP3 size and ``S=`` equals ``W=`` in the name.  The file is written to
``tmp/`` with O_EXCL, fsync'ed, renamed into ``new/`` and ``new/`` is
fsync'ed; on any failure the file in ``tmp/`` is removed, so ``new/`` never
holds a partial message.

The Maildir may be written by its user, so nothing in it is trusted
(fastpop.store.safefs): the Maildir and its tmp/ and new/ are opened without
following links and must be directories owned by the uid the mail is written
as; the file is created with O_EXCL|O_NOFOLLOW in tmp/'s descriptor and
renamed between descriptors; ``maildirsize`` is appended to only if it is a
regular file (and, written as root, the owner's).

Failures raise ``DeliveryError`` carrying a sysexits(3) code, which the LDA
exits with and the LMTP listener turns into a reply.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass

from fastpop import faults
from fastpop.auth.authenticator import Authenticator, valid_username
from fastpop.auth.passwd_file import UserRecord
from fastpop.errors import AuthUnavailable
from fastpop.store import maildirsize, safefs
from fastpop.store.durable import fsync_dir, write_and_sync
from fastpop.store.maildir import ensure_maildir

log = logging.getLogger("fastpop.delivery")

# sysexits(3); os.EX_* exist on every POSIX Python, spelled out for readers.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# errno values that mean "try again later": the disk, the quota, the device,
# the kernel's resources.  Anything not listed elsewhere is treated the same.
_TEMPORARY = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EIO,
    errno.EAGAIN,
    errno.EINTR,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.EROFS,
    errno.ESTALE,
    errno.ETIMEDOUT,
}
# errno values that mean the Maildir cannot be created or written as configured
_CANTCREAT = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.EEXIST,
}
FULL = {errno.ENOSPC, errno.EDQUOT}


class DeliveryError(Exception):
    """A delivery that did not happen; ``code`` is the sysexits(3) status."""

    def __init__(self, code: int, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno_

    @property
    def temporary(self) -> bool:
        return self.code == EX_TEMPFAIL


def exit_code_for(exc: OSError) -> int:
    """The sysexits code for a failure to write a Maildir."""
    if exc.errno in _CANTCREAT:
        return EX_CANTCREAT
    return EX_TEMPFAIL  # _TEMPORARY and anything unforeseen: the MTA retries


def storage_error(exc: OSError, maildir: str) -> DeliveryError:
    what = exc.strerror or type(exc).__name__
    where = exc.filename or maildir
    return DeliveryError(exit_code_for(exc), f"cannot store into {where}: {what}", exc.errno)


# -- unique names


def _sanitise_host(host: str) -> str:
    """The Maildir spec's escapes for '/' and ':'; ',' too (it separates S= and W=)."""
    host = host or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


HOST = _sanitise_host(socket.gethostname())
_counter = itertools.count(1)


def unique_name(when: float | None = None) -> str:
    """``<sec>.M<usec>P<pid>Q<counter>.<host>``; usec is zero-padded so that
    names from one second sort in delivery order."""
    if when is None:
        when = time.time()
    sec, usec = divmod(round(when * 1_000_000), 1_000_000)
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}.{HOST}"


# -- content


def normalize(data: bytes) -> bytes:
    """CRLF line ends (bare LF -> CRLF, bare CR kept), a final CRLF if missing.

    The result is exactly what ``fastpop.wire.stuffing`` sends before dot-stuffing,
    so ``pop3_size`` of the stored file equals its length.  An empty message
    stays empty.
    """
    if not data:
        return b""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not out.endswith(b"\n"):
        out += b"\r\n"
    return out


@dataclass(frozen=True)
class Stored:
    name: str  # file name in new/
    path: str
    size: int


def store_message(maildir: str, data: bytes, *, when: float | None = None, owner: int | None = None,
                  quota: bool = True) -> Stored:
    """normalize() then store_normalized()."""
    return store_normalized(maildir, normalize(data), when=when, owner=owner, quota=quota)


def store_normalized(maildir: str, data: bytes, *, when: float | None = None, owner: int | None = None,
                     quota: bool = True) -> Stored:
    """Write already-normalised content into ``maildir``/new; raises DeliveryError.
    ``owner``: the uid the Maildir must belong to (default: safefs.served_uid(None)).
    ``quota``: refuse it (EX_TEMPFAIL, errno EDQUOT) if it would put the Maildir
    over its Maildir++ quota (``maildirsize``); an import of existing mail passes False."""
    if owner is None:
        owner = safefs.served_uid(None)
    try:
        dirs, owner = _open_dirs(maildir, owner)
    except OSError as exc:
        raise storage_error(exc, maildir) from None
    try:
        if quota:
            over = maildirsize.over_quota(dirs[0], len(data), owner, maildir)
            if over is not None:
                raise DeliveryError(EX_TEMPFAIL, f"mailbox full: {maildir}: {over}", errno.EDQUOT)
        return _store(maildir, dirs, data, when, owner)
    finally:
        for fd in dirs:
            os.close(fd)


def _store(maildir: str, dirs: tuple[int, int, int], data: bytes, when: float | None, owner: int) -> Stored:
    root, tmp_dir, new_dir = dirs
    size = len(data)
    for _attempt in range(10):
        name = f"{unique_name(when)},S={size},W={size}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=tmp_dir)
        except FileExistsError:
            continue  # another deliverer took this name: take the next counter
        except OSError as exc:
            raise storage_error(exc, maildir) from None
        if os.geteuid() == 0 and owner != 0:  # (written as root: the file is the user's, as their Maildir)
            try:
                os.fchown(fd, owner, -1)
            except OSError as exc:
                os.close(fd)
                _unlink_quietly(tmp_dir, name)
                raise storage_error(exc, maildir) from None
        break
    else:
        raise DeliveryError(EX_CANTCREAT, f"cannot find a free name in {maildir}/tmp", errno.EEXIST)
    target = os.path.join(maildir, "new", name)
    try:
        try:
            if faults.ACTIVE:
                faults.hit("deliver.after_create")
            write_and_sync(fd, data)
        finally:
            os.close(fd)
        if faults.ACTIVE:
            faults.hit("deliver.before_rename")
        os.rename(name, name, src_dir_fd=tmp_dir, dst_dir_fd=new_dir)
    except BaseException as exc:
        _unlink_quietly(tmp_dir, name)
        if isinstance(exc, OSError):
            raise storage_error(exc, maildir) from None
        raise
    try:
        if faults.ACTIVE:
            faults.hit("deliver.after_rename")
        os.fsync(new_dir)
    except OSError as exc:
        # The file is complete but its name may not survive a crash: take it
        # back and let the sender retry rather than report a success.
        _unlink_quietly(new_dir, name)
        raise storage_error(exc, maildir) from None
    if faults.ACTIVE:
        faults.hit("deliver.after_fsync")
    _after_store(maildir, root, size, owner)
    return Stored(name, target, size)


def _open_dirs(maildir: str, owner: int) -> tuple[tuple[int, int, int], int]:
    """Descriptors of the Maildir, its tmp/ and its new/, created if missing,
    and the Maildir's owner."""
    try:
        root, owner = safefs.open_maildir(maildir, owner)
    except FileNotFoundError:
        _create(maildir, owner)
        root, owner = safefs.open_maildir(maildir, owner)
    opened = [root]
    try:
        for sub in ("tmp", "new"):
            try:
                opened.append(safefs.open_subdir(root, sub, owner, maildir))
            except FileNotFoundError:
                _create(maildir, owner)
                opened.append(safefs.open_subdir(root, sub, owner, maildir))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    return (opened[0], opened[1], opened[2]), owner


def _create(maildir: str, owner: int) -> None:
    path = os.path.abspath(maildir)
    # The highest directory this may create (makedirs makes the operator's
    # missing levels too, e.g. a new domain's): every created name must reach
    # the disk in its parent's fsync, or a crash loses a message reported stored.
    top = path
    while top != "/" and not os.path.lexists(os.path.dirname(top)):
        top = os.path.dirname(top)
    try:
        ensure_maildir(maildir, owner)
    except FileExistsError as exc:  # makedirs met a file where a directory should be
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a directory should be", exc.filename) from None
    except NotADirectoryError as exc:
        raise NotADirectoryError(errno.ENOTDIR, "a file is where a directory should be", exc.filename) from None
    fsync_dir(path)
    current = path
    while current != top:
        current = os.path.dirname(current)
        fsync_dir(current)
    fsync_dir(os.path.dirname(top))


def _after_store(maildir: str, root: int, size: int, owner: int) -> None:
    """Bookkeeping about the Maildir.

    fastpop's own index (``fastpop.index``, or its file in the ``[mail]
    index`` directory) describes cur/ and is written by the server under the
    session lock; a message waiting in new/ is what tells the next login to
    bring it up to date, which it does from the W= in the name and one read
    of the file (whether a line starts with ".", which RETR then need not
    look for: fastpop.store.measure.measure), so it is left alone here: a
    second writer would race with sessions, and what delivery knows could
    reach the index only through the file's name, which its user may change.  A Maildir++ quota file, as
    Dovecot and Courier keep it, gets the line for one more message."""
    path = os.path.join(maildir, "maildirsize")
    try:
        fd, st = safefs.open_regular(root, "maildirsize", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot update %s: %s", path, exc.strerror)
        return
    try:
        if os.geteuid() == 0 and st.st_uid != owner:
            log.warning("not updating %s: owned by uid %d, written as uid %d", path, st.st_uid, owner)
            return
        os.write(fd, f"{size} 1\n".encode("ascii"))
    except OSError as exc:
        log.warning("cannot update %s: %s", path, exc.strerror)
    finally:
        os.close(fd)


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# -- recipients


@dataclass(frozen=True)
class Recipient:
    address: str  # as given (RCPT TO, --user)
    user: UserRecord
    maildir: str


def candidates(address: str) -> list[str]:
    """User names to try for an address, most specific first: the address as
    given, without a ``+detail``, then the local part alone (for users named
    without a domain), each also with the domain lower-cased."""
    out: list[str] = []

    def add(name: str) -> None:
        if name and name not in out:
            out.append(name)

    local, at, domain = address.rpartition("@") if "@" in address else (address, "", "")
    bases = [local]
    if "+" in local.lstrip("+"):
        bases.append(local.split("+", 1)[0])
    for base in bases:
        if at:
            add(f"{base}@{domain}")
            add(f"{base}@{domain.lower()}")
    for base in bases:
        add(base)
    return out


def resolve(auth: Authenticator, address: str) -> Recipient | None:
    """The user an address delivers to, or None if there is none.

    Raises AuthUnavailable if the user database cannot be read and
    DeliveryError(EX_CONFIG) if the user's mail location cannot be expanded.
    """
    for name in candidates(address):
        if not valid_username(name):
            continue
        record = auth.lookup(name)
        if record is not None:
            return _recipient(auth, address, record)
    return None


async def resolve_async(auth: Authenticator, address: str) -> Recipient | None:
    """``resolve`` for any user database (SQL and LDAP are asynchronous)."""
    for name in candidates(address):
        if not valid_username(name):
            continue
        record = await auth.lookup_async(name)
        if record is not None:
            return _recipient(auth, address, record)
    return None


def _recipient(auth: Authenticator, address: str, record: UserRecord) -> Recipient:
    try:
        maildir = auth.maildir_for(record)
    except ValueError as exc:
        raise DeliveryError(EX_CONFIG, f"mail location for {record.name}: {exc}") from None
    return Recipient(address, record, maildir)


__all__ = [
    "AuthUnavailable",
    "DeliveryError",
    "Recipient",
    "Stored",
    "candidates",
    "normalize",
    "resolve",
    "resolve_async",
    "store_message",
    "store_normalized",
    "unique_name",
]
