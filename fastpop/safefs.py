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

import ctypes
import errno
import os
import stat

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_MESSAGE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block
NAME_MAX = 255

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (a "common" syscall)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syscall = _libc.syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    _HAVE_OPENAT2 = True
except (OSError, AttributeError):  # pragma: no cover - no libc syscall(): walk instead
    _HAVE_OPENAT2 = False


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


_canonical_parents: dict[str, str] = {}


def canonical_maildir(path: str) -> str:
    """The Maildir path with the operator's links above it resolved and its
    own last component kept as it is (a link there is refused on open)."""
    path = os.path.normpath(os.path.abspath(path))
    parent, _, last = path.rpartition("/")
    real = _canonical_parents.get(parent)
    if real is None:
        real = os.path.realpath(parent or "/")
        if len(_canonical_parents) >= 4096:
            _canonical_parents.clear()
        _canonical_parents[parent] = real
    return (real if real != "/" else "") + "/" + last


def forget_canonical(path: str) -> None:
    """Resolve the Maildir's parents again next time (an operator moved them)."""
    _canonical_parents.pop(os.path.normpath(os.path.abspath(path)).rpartition("/")[0], None)


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """open(2) of an absolute path that must contain no symbolic link in any
    component: ELOOP if one does.  O_NOFOLLOW and O_CLOEXEC are added."""
    global _HAVE_OPENAT2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _HAVE_OPENAT2:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM, errno.E2BIG):
            raise OSError(err, os.strerror(err), path)
        if err == errno.ENOSYS:
            _HAVE_OPENAT2 = False
        # EPERM from a seccomp filter that knows no openat2, E2BIG: walk instead
    return _walk(path, flags, mode)


def _walk(path: str, flags: int, mode: int) -> int:
    """open_nofollow without openat2: one O_NOFOLLOW openat per component."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or not parts:
        raise OSError(errno.EINVAL, "not an absolute path to a file", path)
    fd = os.open("/", _O_PATH_DIR)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _O_PATH_DIR, dir_fd=fd)
            except NotADirectoryError:  # a link where a directory was: what openat2 says
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, mode, dir_fd=fd)
    finally:
        os.close(fd)


ANY_OWNER = -1  # served as root for a user without a uid: as whoever owns the Maildir


def served_uid(user_uid: int | None) -> int:
    """The uid whose mail this process may touch for a user: its own; when it
    runs as root (allow_mail_as_root), the user's uid, or for a user without
    one ANY_OWNER: the Maildir's owner, whose files alone are then served."""
    euid = os.geteuid()
    if euid != 0:
        return euid
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
        if exc.errno == errno.ENOTDIR and _exists(path):  # (not a file above it)
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


def _exists(path: str) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


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
