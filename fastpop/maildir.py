"""Maildir storage: scanning a mailbox at login, message files, deletion.

At login, messages in new/ move to cur/ with ``:2,`` info (as Dovecot does),
then cur/ is listed and numbered 1..N in delivery order.  Sizes come from
``W=`` in the file name (the CRLF size) when present, else the file is read
once and the result cached by its unique name, which never changes content.
Nothing is deleted here except by ``delete()``, which the protocol calls only
in the UPDATE state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from array import array

from fastpop.stuffing import pop3_size

log = logging.getLogger("fastpop.maildir")
SUBDIRS = ("cur", "new", "tmp")
_SIZE_CACHE: dict[tuple[str, str], int] = {}
_SIZE_CACHE_MAX = 200_000


def ensure_maildir(path: str) -> None:
    for sub in SUBDIRS:
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)


def parse_name(name: str) -> tuple[str, int, int]:
    """'123.M4P5.host,S=100,W=102:2,S' -> (base, S, W); sizes -1 when absent."""
    base = name.split(":", 1)[0]
    s = w = -1
    fields = base.split(",")
    for f in fields[1:]:
        if f.startswith("S="):
            s = _int_or(f[2:], -1)
        elif f.startswith("W="):
            w = _int_or(f[2:], -1)
    return fields[0], s, w


def _int_or(text: str, default: int) -> int:
    return int(text) if text.isdigit() else default


def uidl_of(name: str) -> str:
    """A stable UIDL from the Maildir unique name (RFC 1939: 1-70 chars, 0x21-0x7E)."""
    unique = name.split(":", 1)[0].split(",", 1)[0]
    # isprintable() on ASCII is 0x20-0x7E; the space is excluded separately
    if 0 < len(unique) <= 70 and unique.isascii() and unique.isprintable() and " " not in unique:
        return unique
    return hashlib.md5(unique.encode("utf-8", "surrogateescape")).hexdigest()


def _delivery_order(name: str) -> tuple[int, str]:
    head = name.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, name)


class Mailbox:
    """A snapshot of one Maildir taken at login: numbering is fixed for the session."""

    __slots__ = ("path", "_cur", "names", "sizes", "total_size")

    def __init__(self, path: str, names: list[str], sizes: array) -> None:
        self.path = path
        self._cur = os.path.join(path, "cur", "")
        self.names = names
        self.sizes = sizes
        self.total_size = sum(sizes)

    @classmethod
    def open(cls, path: str) -> Mailbox:
        cur = os.path.join(path, "cur")
        new = os.path.join(path, "new")
        try:
            new_names = os.listdir(new)
        except FileNotFoundError:
            ensure_maildir(path)
            new_names = []
        for name in new_names:
            if name.startswith("."):
                continue
            target = name if ":" in name else name + ":2,"
            try:
                os.rename(os.path.join(new, name), os.path.join(cur, target))
            except FileNotFoundError:
                pass  # moved by another program in the meantime
        names = sorted((n for n in os.listdir(cur) if not n.startswith(".")), key=_delivery_order)
        sizes = array("q")
        kept: list[str] = []
        for name in names:
            size = message_size(cur, name)
            if size >= 0:
                kept.append(name)
                sizes.append(size)
        return cls(path, kept, sizes)

    def __len__(self) -> int:
        return len(self.names)

    def file_path(self, index: int) -> str:
        return self._cur + self.names[index]

    def uidl(self, index: int) -> str:
        return uidl_of(self.names[index])

    def find_renamed(self, index: int) -> str | None:
        """Path of message ``index`` if another program (an IMAP server setting
        flags) renamed it since login: same unique name, other info suffix."""
        base = self.names[index].split(":", 1)[0]
        prefix = base + ":"
        try:
            names = os.listdir(self._cur)
        except OSError:
            return None
        for name in names:
            if name == base or name.startswith(prefix):
                self.names[index] = name
                return self._cur + name
        return None

    def delete(self, indices: list[int]) -> int:
        """Unlink these messages; returns how many could not be removed."""
        failed = 0
        for i in indices:
            try:
                os.unlink(self.file_path(i))
            except FileNotFoundError:
                renamed = self.find_renamed(i)
                if renamed is not None:
                    try:
                        os.unlink(renamed)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        failed += 1
                # else: already removed by another program
            except OSError:
                failed += 1
        _fsync_dir(self._cur)
        return failed


_VSIZE = re.compile(r",W=(\d+)")


def message_size(cur: str, name: str) -> int:
    """The POP3 size of cur/name, or -1 if the file vanished or is unreadable.

    W= in the name is the CRLF size, but writers (Dovecot among them) do not
    count the CRLF that RETR must add to a message lacking a final newline;
    so the last byte is checked once per message and the result cached.
    """
    key = (cur, name.split(":", 1)[0])
    cached = _SIZE_CACHE.get(key)
    if cached is not None:
        return cached
    path = os.path.join(cur, name)
    try:
        m = _VSIZE.search(name)
        colon = name.find(":")
        if m is not None and (colon < 0 or m.start() < colon):  # W= of the name, not of the flags
            size = int(m.group(1))
            if size > 0 and not _ends_with_lf(path):
                size += 2
        else:
            size = pop3_size(path)
    except OSError as exc:
        log.warning("skipping unreadable message %s/%s: %s", cur, name, exc.strerror)
        return -1
    if len(_SIZE_CACHE) >= _SIZE_CACHE_MAX:
        _SIZE_CACHE.clear()
    _SIZE_CACHE[key] = size
    return size


def _ends_with_lf(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) == b"\n"
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
