"""Pure-Python twin of ``fastpop.store._safefs``: open a path with no symbolic link in
any component (openat2 RESOLVE_NO_SYMLINKS through ctypes, else a walk of
O_NOFOLLOW opens).  Same results as the compiled one; ``fastpop/store/safefs.py``
says why and picks one."""

from __future__ import annotations

import ctypes
import errno
import os

_SYS_OPENAT2 = 437  # the same number on every Linux architecture (a "common" syscall)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_AT_FDCWD = -100
_O_PATH_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
    _syscall.restype = ctypes.c_long
    _syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    _have_openat2 = True
except (OSError, AttributeError):  # pragma: no cover - no libc syscall(): walk instead
    _have_openat2 = False


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """open(2) of an absolute path that must contain no symbolic link in any
    component: ELOOP if one does.  O_NOFOLLOW and O_CLOEXEC are added."""
    global _have_openat2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if _have_openat2:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        fd = _syscall(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            _have_openat2 = False
        elif err not in (errno.EPERM, errno.E2BIG):  # EPERM: a seccomp filter that knows no openat2
            raise OSError(err, os.strerror(err), path)
    return walk(path, flags, mode)


def walk(path: str, flags: int, mode: int = 0o600) -> int:
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
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def has_entries(fd: int, most: int = -1) -> bool:
    """Whether the directory open as ``fd`` holds a name not starting with ".";
    ``most`` (if not negative): after that many entries without an answer, True."""
    with os.scandir(fd) as it:
        for seen, entry in enumerate(it, 1):
            if entry.name[0] != "." or 0 <= most < seen:
                return True
    return False
