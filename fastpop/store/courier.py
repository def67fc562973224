"""UIDLs other servers served: Courier's ``courierpop3dsizelist``, and the
rule that makes any UIDL one RFC 1939 allows.

Courier's POP3 (courier-imap pop3dserver.c, list versions 2 and 3) keeps in
the Maildir::

    /<version> <next uid> <uidvalidity>
    <file name> <size> <uid>:<uidvalidity>[:<utf8>]

one line per message; the file name may hold spaces (Courier splits at the
last two), only its part before ":" (the Maildir info) names the message.
Courier serves ``UID<uid>-<uidvalidity>`` (``UID<uid>`` when the
UIDVALIDITY is 0), or for a record with UID 0 (converted from the old
list format) the file name up to ":", each byte outside 0x21-0x7E and each
``'``, ``"`` and ``+`` written ``+XX`` (hex).  A file of another version is
ignored, as Courier ignores it (it then gives new UIDs: nothing served
under the old ones can be kept).

The file lies in the user-writable Maildir: it is opened without following
a link, must be a regular file, is read up to MAX_BYTES, and a line that does
not parse is skipped (as Courier skips it); nothing in it raises.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Container, Iterator

from fastpop.store import safefs

log = logging.getLogger("fastpop.maildir")

SIZELIST = "courierpop3dsizelist"
# Bounded: some hundred thousand messages' lines.  A larger file is ignored.
MAX_BYTES = 32 * 1024 * 1024
MAX_LINE = 2028  # Courier's linebuf (2048) less its 20 bytes of room: longer lines are cut, as Courier does
_UIDL_EXTRA = frozenset(b"'\"+")


def valid_uidl(text: str) -> bool:
    """RFC 1939: 1 to 70 characters, each 0x21-0x7E."""
    return 0 < len(text) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in text)


def safe_uidl(text: str) -> str:
    """``text`` if RFC 1939 allows it as a UIDL, else a replacement that is
    always the same for the same text: the MD5 of its bytes in hex (32
    characters; what fastpop.store.maildir_names.uidl_of always gave a Maildir name
    that is no UIDL, so neither changes)."""
    if valid_uidl(text):
        return text
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


def _number(text: bytes) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 10 else None


def filename_uidl(base: bytes) -> str:
    """Courier's UIDL for a message without a UID: its name up to ":", bytes
    outside 0x21-0x7E and ' " + written +XX."""
    out = []
    for b in base.split(b":", 1)[0]:
        if b < 0x21 or b > 0x7E or b in _UIDL_EXTRA:
            out.append(f"+{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out)


def _lines(data: bytes, start: int) -> Iterator[bytes]:
    """The file's lines from ``start`` up to its last newline (after it: nothing,
    or a line Courier never finished), a block at a time (safefs.line_blocks)."""
    for block in safefs.line_blocks(data, start):
        yield from block.split(b"\n")


def parse(data: bytes, wanted: Container[str] | None = None) -> dict[str, str]:
    """{base name (before ":"): the UIDL Courier served} from the file's
    bytes; {} for a file Courier would not read.  The UIDLs are as Courier
    sent them, valid or not (safe_uidl makes them valid).  ``wanted``: only
    these base names (the user may fill the file with made-up lines: what is
    kept grows with the messages asked about, not with the file)."""
    first, sep, _ = data.partition(b"\n")
    if not sep or not first.startswith(b"/"):
        return {}
    head = first[1:].split()
    if len(head) < 2 or head[0] not in (b"2", b"3") or _number(head[1]) is None:
        return {}
    out: dict[str, str] = {}
    for line in _lines(data, len(first) + 1):
        line = line[:MAX_LINE]
        name_size, sp, ids = line.rpartition(b" ")
        name, sp2, size = name_size.rpartition(b" ")
        if not sp or not sp2 or not name or _number(size) is None:
            continue
        fields = ids.split(b":")
        if len(fields) not in (2, 3):
            continue
        uid, uidv = _number(fields[0]), _number(fields[1])
        if uid is None or uidv is None:
            continue
        # only a key to match cur/'s names against: after the last "/", as Courier compares them
        base = name.rsplit(b"/", 1)[-1].split(b":", 1)[0]
        if not base or b"\0" in base or base.startswith(b"."):
            continue
        key = base.decode("utf-8", "surrogateescape")
        if wanted is not None and key not in wanted:
            continue
        if uid == 0:
            out[key] = filename_uidl(base)
        else:
            out[key] = f"UID{uid}-{uidv}" if uidv else f"UID{uid}"
    return out


def read(dir_fd: int, where: str = "", wanted: Container[str] | None = None) -> dict[str, str]:
    """The Courier UIDLs of the Maildir open as ``dir_fd``; {} if it has no
    courierpop3dsizelist, or one that is a link, not a regular file, too
    large or unreadable (logged).  ``wanted``: see parse."""
    try:
        fd, st = safefs.open_regular(dir_fd, SIZELIST)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            log.warning("ignoring %s/%s: a symbolic link", where, SIZELIST)
        else:
            log.warning("ignoring %s/%s: %s", where, SIZELIST, exc.strerror)
        return {}
    try:
        if st.st_size > MAX_BYTES:
            log.warning("ignoring %s/%s: over %d bytes", where, SIZELIST, MAX_BYTES)
            return {}
        data = os.pread(fd, MAX_BYTES + 1, 0)
        if len(data) > MAX_BYTES:
            log.warning("ignoring %s/%s: over %d bytes", where, SIZELIST, MAX_BYTES)
            return {}
    except OSError as exc:
        log.warning("ignoring %s/%s: %s", where, SIZELIST, exc.strerror)
        return {}
    finally:
        os.close(fd)
    return parse(data, wanted)
