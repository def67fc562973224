# cython: language_level=3
"""Compiled ``open_nofollow``: one openat2(2) with RESOLVE_NO_SYMLINKS, called
per RETR, so without ctypes' per-call cost.  The pure-Python twin is
``fastpop/store/_safefs_py.py`` (also the fallback walk where openat2 is missing);
``fastpop/store/safefs.py`` says why and picks one."""

cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)
from libc.errno cimport errno, ENOSYS, EPERM, E2BIG
from libc.stdint cimport int64_t, uint64_t

from fastpop.store._safefs_py import walk

import os

cdef extern from "<fcntl.h>":
    const int AT_FDCWD
    const int O_NOFOLLOW
    const int O_CLOEXEC
    const int O_CREAT

cdef extern from "<unistd.h>":
    long syscall(long number, ...) nogil

cdef struct open_how:
    uint64_t flags
    uint64_t mode
    uint64_t resolve

cdef enum:
    SYS_OPENAT2 = 437  # the same number on every Linux architecture
    RESOLVE_NO_MAGICLINKS = 0x02
    RESOLVE_NO_SYMLINKS = 0x04

cdef bint have_openat2 = True


def open_nofollow(str path, int flags, int mode=0o600):
    """open(2) of an absolute path that must contain no symbolic link in any
    component: ELOOP if one does.  O_NOFOLLOW and O_CLOEXEC are added."""
    global have_openat2
    cdef bytes encoded
    cdef open_how how
    cdef long fd
    cdef int err
    flags |= O_NOFOLLOW | O_CLOEXEC
    if have_openat2:
        encoded = PyUnicode_EncodeFSDefault(path)
        how.flags = <unsigned int>flags
        how.mode = <uint64_t>mode if flags & O_CREAT else 0
        how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
        fd = syscall(SYS_OPENAT2, <int>AT_FDCWD, <const char*>encoded, &how, sizeof(open_how))
        if fd >= 0:
            return fd
        err = errno
        if err == ENOSYS:
            have_openat2 = False
        elif err != EPERM and err != E2BIG:  # EPERM: a seccomp filter that knows no openat2
            raise OSError(err, os.strerror(err), path)
    return walk(path, flags, mode)


cdef extern from "<sys/syscall.h>":
    const long SYS_getdents64

cdef struct dirent64_head:  # struct linux_dirent64 up to the name
    uint64_t d_ino
    int64_t d_off
    unsigned short d_reclen
    unsigned char d_type


def has_entries(int fd, long most=-1):
    """Whether the directory open as ``fd`` holds a name not starting with
    "." (a message waiting in new/), read with getdents64 from the
    descriptor's current offset; the descriptor is left for the caller to close.
    ``most`` (if not negative): after that many entries without an answer, True
    (may have one: its user can fill it with hidden names, and the caller, the
    event loop, leaves a long listing to a thread)."""
    cdef char buf[4096]
    cdef long n, pos
    cdef long seen = 0
    cdef dirent64_head* d
    cdef const char* name
    while True:
        with nogil:
            n = syscall(SYS_getdents64, fd, buf, sizeof(buf))
        if n < 0:
            raise OSError(errno, os.strerror(errno))
        if n == 0:
            return False
        pos = 0
        while pos < n:
            d = <dirent64_head*>(buf + pos)
            name = buf + pos + sizeof(uint64_t) + sizeof(int64_t) + sizeof(unsigned short) + sizeof(unsigned char)
            if name[0] != 46:  # "."
                return True
            seen += 1
            if 0 <= most < seen:
                return True
            pos += d.d_reclen
