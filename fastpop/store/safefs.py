"""Opening what lies under a Maildir as untrusted input.

Everything below a Maildir, names, links and file types included, is chosen
by whoever can write it: the user, a webmail, a compromised account.  So from
the Maildir down no symbolic link is ever followed, names are checked before
use, only regular files are read, and directories must belong to the uid the
mail is served as.  The directories above the Maildir are the operator's: they
are resolved once (``canonical_maildir``) and may be links.

A path made of a canonical Maildir and checked names holds no link at all,
so ``open_nofollow`` opens it in one openat2(2) call with RESOLVE_NO_SYMLINKS
(the kernel refuses a link in any component), the same cost as a plain open
and no descriptor kept per session.  Where openat2 is missing (Linux < 5.6,
some seccomp filters) it walks the components with O_NOFOLLOW instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastpop import _compiled

_impl = _compiled.load("fastpop.store._safefs")
SAFEFS_IMPL = _compiled.LOADED["fastpop.store._safefs"]  # "cython" or "python"
if TYPE_CHECKING:
    from fastpop.store._safefs_py import has_entries, open_nofollow
else:
    has_entries, open_nofollow = _impl.has_entries, _impl.open_nofollow

__all__ = ["ANY_OWNER", "O_MESSAGE", "SAFEFS_IMPL", "canonical_maildir", "check_directory", "euid", "forget_euid",
           "has_entries",
           "line_blocks", "open_maildir", "open_nofollow", "open_regular", "open_subdir", "served_uid", "valid_name"]

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_MESSAGE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
NAME_MAX = 255


def valid_name(name: str) -> bool:
    """Whether a name from an index or a listing may be a Maildir entry:
    one component, not hidden (nor . or ..), no NUL, at most NAME_MAX bytes."""
    return (
        0 < len(name) <= NAME_MAX
        and name[0] != "."
        and "/" not in name
        and "\0" not in name
        and len(os.fsencode(name)) <= NAME_MAX
    )


_canonical: dict[str, str] = {}  # by the path as configured: one dict lookup per login


def canonical_maildir(path: str) -> str:
    """The Maildir path with the operator's links above it resolved and its
    own last component kept as it is (a link there is refused on open)."""
    found = _canonical.get(path)
    if found is None:
        parent, _, last = os.path.normpath(os.path.abspath(path)).rpartition("/")
        real = os.path.realpath(parent or "/")
        found = (real if real != "/" else "") + "/" + last
        if len(_canonical) >= 8192:
            _canonical.clear()
        _canonical[path] = found
    return found


def forget_canonical(path: str) -> None:
    """Resolve the Maildir's parents again next time (an operator moved them)."""
    _canonical.pop(path, None)


ANY_OWNER = -1  # served as root for a user without a uid: as whoever owns the Maildir
_euid: int | None = None


def euid() -> int:
    """This process's effective uid, asked of the kernel once (every login
    needs it): whoever changes it (setuid) calls forget_euid()."""
    global _euid
    if _euid is None:
        _euid = os.geteuid()
    return _euid


def forget_euid() -> None:
    """After a change of the effective uid (privileges dropped)."""
    global _euid
    _euid = None


def served_uid(user_uid: int | None) -> int:
    """The uid whose mail this process may touch for a user: its own; when it
    runs as root (allow_mail_as_root), the user's uid, or for a user without
    one ANY_OWNER: the Maildir's owner, whose files alone are then served."""
    uid = euid()
    if uid != 0:
        return uid
    return ANY_OWNER if user_uid is None else user_uid


def check_directory(st: os.stat_result, owner: int, path: str) -> int:
    """A Maildir or one of its subdirectories: a directory owned by ``owner``
    (ANY_OWNER: by anyone); returns its owner."""
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    if st.st_uid != owner and owner != ANY_OWNER:
        raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, served as uid {owner}", path)
    return st.st_uid


def open_maildir(path: str, owner: int) -> tuple[int, int]:
    """A descriptor of the Maildir itself (O_RDONLY|O_DIRECTORY), which must
    be a real directory owned by ``owner``; ELOOP if it is a link.  Returns
    the descriptor and the owner (ANY_OWNER resolved to the Maildir's)."""
    canonical = canonical_maildir(path)
    try:
        fd = open_nofollow(canonical, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:  # O_DIRECTORY met a link or a file (or a file above it)
            kind = _kind(path)
            if kind == "link":
                raise OSError(errno.ELOOP, "a symbolic link (refused)", path) from None
            if kind == "other":
                raise NotADirectoryError(errno.ENOTDIR, "a file is where a directory should be", path) from None
        if exc.errno != errno.ELOOP:
            raise
        forget_canonical(path)  # perhaps the operator replaced a parent by a link
        canonical = canonical_maildir(path)
        try:
            fd = open_nofollow(canonical, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as again:
            if again.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symbolic link (refused)", path) from None
            raise
    try:
        owner = check_directory(os.fstat(fd), owner, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, owner


def open_subdir(dir_fd: int, name: str, owner: int, where: str) -> int:
    """cur/, new/ or tmp/ of an open Maildir: a directory owned by ``owner``."""
    try:
        fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, _what_is(dir_fd, name), f"{where}/{name}") from None
        raise
    try:
        check_directory(os.fstat(fd), owner, f"{where}/{name}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(path: str) -> str:
    """"link", "dir", "other" or "none": what the last component of ``path`` is."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "none"
    return "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def _what_is(dir_fd: int, name: str) -> str:
    """Why a directory could not be opened, for the log and the error."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return "not a directory"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link (refused)"
    return "a file is where a directory should be"


def open_regular(dir_fd: int, name: str, flags: int = O_MESSAGE, mode: int = 0o600) -> tuple[int, os.stat_result]:
    """A regular file in an open directory, never through a link: (fd, its stat).
    Anything else (FIFO, device, socket, directory) is ELOOP/EINVAL-like OSError."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


LINE_BLOCK = 1 << 20  # octets of lines handed out at once by line_blocks


def line_blocks(data: bytes, start: int = 0) -> Iterator[bytes]:
    """The lines of ``data`` from ``start`` up to its last newline (after it:
    nothing, or a line its writer has not finished), as blocks of about
    LINE_BLOCK octets of whole lines, without their last newline: split each
    with ``split(b"\n")``.  A file its user writes may be made of millions of
    short lines, and a list of them all holds many times the file."""
    end = data.rfind(b"\n")
    while start <= end:
        cut = data.find(b"\n", min(start + LINE_BLOCK, end))  # (data[end] is one: never -1)
        yield data[start:cut]
        start = cut + 1
