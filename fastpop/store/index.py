"""The per-mailbox index: ``fastpop.index`` inside each Maildir.

A cache of what a login needs (message names, POP3 sizes, UIDLs) so STAT
is answered from a header and LIST/UIDL stream from fixed-size records,
without opening message files.  Deleting it loses nothing: it is rebuilt
from the Maildir, and UIDLs come from the Maildir names (or Dovecot's
``dovecot-uidlist``), never from the index, so they survive a rebuild.

File format, version 1 (all integers little-endian)::

    header, 64 bytes:
      0  magic        8s   b"FASTPOPI"
      8  version      u32  1
     12  count        u32  number of records
     16  total_size   u64  sum of the records' POP3 sizes
     24  cur_mtime    i64  cur/'s mtime (ns) the records reflect; 0 = unknown
     32  names_off    u64  offset of the name table
     40  names_size   u64  its length
     48  uidvalidity  u32  Dovecot UIDVALIDITY the UIDLs came from, or 0
     52  flags        u32  reserved, 0
     56  checksum     u32  CRC-32 of the file with this field zeroed
     60  reserved     4 bytes
    records, 32 bytes each, in message-number order:
      0  size         u64  octets RETR sends before dot-stuffing
      8  file_size    u64  octets in the file
     16  name_off     u32  offset of the file name within the name table
     20  name_len     u16  the name (as in cur/, info suffix included)
     22  uidl_len     u16  the UIDL, stored right after the name
     24  flags        u32  bit 0: stored exactly as sent (CRLF, final CRLF)
     28  reserved     4 bytes
    name table: names and UIDLs, bytes, no separators

It is written whole to a temporary file, fsync'ed and renamed over the old
one, so a crash leaves the old index or the new, never a mix; one that is
truncated, corrupt (checksum, or records that point outside the name table
or do not add up to the header's total), foreign or of another version is
rebuilt with a log line and never served.

The file lies in the Maildir, so whoever can write the Maildir can write it:
it is checked as input from that user.  A name that is not one Maildir entry
(a "/", NUL, a leading dot, empty, over 255 bytes) or a UIDL that RFC 1939
does not allow (1-70 octets, 0x21-0x7E) fails validation like a bad checksum.
The temporary file has an unpredictable name and is created with
O_EXCL|O_NOFOLLOW in the Maildir's descriptor; the index itself is opened
with O_NOFOLLOW and must be a regular file.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING

from fastpop import _compiled, faults
from fastpop.store import safefs
from fastpop.store.durable import write_and_sync

_impl = _compiled.load("fastpop.store._index")
if TYPE_CHECKING:
    from fastpop.store._index_py import check_records, format_list, format_uidl
else:
    check_records, format_list, format_uidl = _impl.check_records, _impl.format_list, _impl.format_uidl

log = logging.getLogger("fastpop.index")

INDEX_FILE = "fastpop.index"
MAGIC = b"FASTPOPI"
VERSION = 1
HEADER = struct.Struct("<8sIIQqQQIII4x")
RECORD = struct.Struct("<QQIHHI4x")
_RETR_FIELDS = struct.Struct("<QQIH")  # a record's size, file_size, name_off, name_len
_FS_ENCODING = sys.getfilesystemencoding()  # names decode as os.fsdecode does
CHECKSUM_AT = 56
FLAG_STORED_AS_SENT = 1

# Indexes validated in this process, by Maildir, while their file is unchanged
# (same inode, mtime, size), bounded in number and in bytes.  They are read
# into memory, not mapped: a mapping of a file that another program
# truncates raises SIGBUS, which would kill every session of the process, and
# an in-place write would change what an open session sees.
# Its user can write it: a larger file is not read (about 2 million messages fit).
MAX_INDEX_BYTES = 256 * 1024 * 1024
_CACHE_MAX = 4096
_CACHE_MAX_BYTES = 256 * 1024 * 1024
_cache: OrderedDict[str, tuple[tuple[int, int, int], MailboxIndex]] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()  # indexes are rebuilt in worker threads too

assert HEADER.size == 64 and RECORD.size == 32


class IndexCorrupt(ValueError):
    """The index file cannot be used (it will be rebuilt)."""


class Entry:
    """One message while an index is being built."""

    __slots__ = ("name", "size", "file_size", "flags", "uidl")

    def __init__(self, name: str, size: int, file_size: int, flags: int, uidl: str) -> None:
        self.name = name
        self.size = size
        self.file_size = file_size
        self.flags = flags
        self.uidl = uidl


class MailboxIndex:
    """Read side of one index file, held in memory as bytes."""

    __slots__ = ("buf", "count", "total_size", "cur_mtime_ns", "uidvalidity", "names_off")

    def __init__(self, buf) -> None:
        if len(buf) < HEADER.size:
            raise IndexCorrupt("truncated header")
        (magic, version, count, total, cur_mtime, names_off, names_size, uidvalidity,
         _flags, _sum) = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise IndexCorrupt("not a fastpop index")
        if version != VERSION:
            raise IndexCorrupt(f"index version {version}, expected {VERSION}")
        if names_off != HEADER.size + count * RECORD.size or names_off + names_size != len(buf):
            raise IndexCorrupt("truncated or inconsistent lengths")
        self.buf = buf
        self.count = count
        self.total_size = total
        self.cur_mtime_ns = cur_mtime
        self.uidvalidity = uidvalidity
        self.names_off = names_off

    def verify(self) -> None:
        """Checksum, then the records against the name table and the total:
        a file that passes can be served without further checks."""
        buf = self.buf
        stored = struct.unpack_from("<I", buf, CHECKSUM_AT)[0]
        crc = zlib.crc32(buf[:CHECKSUM_AT])
        crc = zlib.crc32(b"\0\0\0\0", crc)
        crc = zlib.crc32(buf[CHECKSUM_AT + 4 :], crc)
        if crc != stored:
            raise IndexCorrupt("checksum mismatch")
        try:
            total = check_records(buf, self.count, self.names_off)
        except ValueError as exc:
            raise IndexCorrupt(str(exc)) from None
        if total != self.total_size:
            raise IndexCorrupt("total size does not match the records")

    def record(self, i: int) -> tuple[int, int, int, int, int, int]:
        """(size, file_size, name_off, name_len, uidl_len, flags) of message i (0-based)."""
        return RECORD.unpack_from(self.buf, HEADER.size + i * RECORD.size)

    def size(self, i: int) -> int:
        return struct.unpack_from("<Q", self.buf, HEADER.size + i * RECORD.size)[0]

    def name(self, i: int) -> str:
        return self.message(i)[0]

    def message(self, i: int) -> tuple[str, int, int]:
        """(file name, POP3 size, file size) of message i: what RETR needs, in one unpack."""
        size, file_size, off, name_len = _RETR_FIELDS.unpack_from(self.buf, HEADER.size + i * RECORD.size)
        start = self.names_off + off
        return self.buf[start : start + name_len].decode(_FS_ENCODING, "surrogateescape"), size, file_size

    def uidl(self, i: int) -> str:
        _, _, off, name_len, uidl_len, _ = self.record(i)
        start = self.names_off + off + name_len
        return bytes(self.buf[start : start + uidl_len]).decode("ascii")

    def list_lines(self, deleted: bytearray) -> bytes:
        """The body of a LIST response, messages marked in ``deleted`` left out."""
        return format_list(self.buf, self.count, deleted)

    def uidl_lines(self, deleted: bytearray) -> bytes:
        """The body of a UIDL response, messages marked in ``deleted`` left out."""
        return format_uidl(self.buf, self.count, self.names_off, deleted)

    def entries(self) -> list[Entry]:
        out = []
        for i in range(self.count):
            size, file_size, off, name_len, uidl_len, flags = self.record(i)
            start = self.names_off + off
            name = os.fsdecode(bytes(self.buf[start : start + name_len]))
            uidl = bytes(self.buf[start + name_len : start + name_len + uidl_len]).decode("ascii")
            out.append(Entry(name, size, file_size, flags, uidl))
        return out


def encode(entries: list[Entry], cur_mtime_ns: int, uidvalidity: int) -> bytes:
    """The bytes of an index file for these entries, checksum included."""
    names = bytearray()
    records = bytearray()
    total = 0
    for e in entries:
        name = os.fsencode(e.name)
        uidl = e.uidl.encode("ascii")
        if len(name) > 0xFFFF or len(uidl) > 0xFFFF:
            raise ValueError(f"name too long for the index: {e.name!r}")
        records += RECORD.pack(e.size, e.file_size, len(names), len(name), len(uidl), e.flags)
        names += name
        names += uidl
        total += e.size
    names_off = HEADER.size + len(records)
    header = HEADER.pack(MAGIC, VERSION, len(entries), total, cur_mtime_ns, names_off, len(names), uidvalidity, 0, 0)
    data = bytearray(header) + records + names
    struct.pack_into("<I", data, CHECKSUM_AT, zlib.crc32(data))
    return bytes(data)


def write(maildir: str, entries: list[Entry], cur_mtime_ns: int, uidvalidity: int, dir_fd: int | None = None) -> None:
    """Replace the index crash-safely: temporary file, fsync, rename.
    ``dir_fd``: the Maildir, open (else it is opened here, never through a link)."""
    data = encode(entries, cur_mtime_ns, uidvalidity)
    if dir_fd is None:
        fd = safefs.open_nofollow(safefs.canonical_maildir(maildir), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return write(maildir, entries, cur_mtime_ns, uidvalidity, fd)
        finally:
            os.close(fd)
    # unpredictable and exclusive: nothing planted under this name is opened
    tmp = f"{INDEX_FILE}.tmp.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            write_and_sync(fd, data)
        finally:
            os.close(fd)
        if faults.ACTIVE:
            faults.hit("index.before_rename")
        os.replace(tmp, INDEX_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:  # a full disk must not keep a partial copy of the index as well
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    _forget(maildir)
    if faults.ACTIVE:
        faults.hit("index.after_rename")


def _forget(maildir: str) -> None:
    global _cache_bytes
    with _cache_lock:
        old = _cache.pop(maildir, None)
        if old is not None:
            _cache_bytes -= len(old[1].buf)


def load(maildir: str, dir_fd: int | None = None) -> MailboxIndex | None:
    """The index of this Maildir if it is present and valid, else None.
    ``dir_fd``: the Maildir, open (else by its canonical path; never through a link).

    A file that was validated before in this process and has not changed
    since (same inode, mtime and size) is not read again, so a warm login
    costs one stat; a damaged file is logged and left for the rebuild.
    """
    global _cache_bytes
    path = maildir + "/" + INDEX_FILE  # (for log lines)
    try:  # the warm path: one system call
        if dir_fd is None:  # (the Maildir's parents are the operator's; a link below is refused on open)
            st = os.stat(safefs.canonical_maildir(maildir) + "/" + INDEX_FILE, follow_symlinks=False)
        else:
            st = os.stat(INDEX_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    with _cache_lock:
        cached = _cache.get(maildir)
        if cached is not None and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
            _cache.move_to_end(maildir)
            return cached[1]
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
        log.warning("ignoring index %s (not a regular file, or over %d bytes); rebuilding it", path, MAX_INDEX_BYTES)
        return None
    try:
        if dir_fd is None:
            fd = safefs.open_nofollow(safefs.canonical_maildir(maildir) + "/" + INDEX_FILE, safefs.O_MESSAGE)
        else:
            fd = os.open(INDEX_FILE, safefs.O_MESSAGE, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable (a root-owned copy), or a link planted since: rebuilt, replaced by rename
        log.warning("ignoring index %s (%s); rebuilding it", path, exc.strerror)
        return None
    try:
        st = os.fstat(fd)  # of the file actually read
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
            log.warning("ignoring index %s (not a regular file, or over %d bytes); rebuilding it", path,
                        MAX_INDEX_BYTES)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            buf = _read_all(fd, st.st_size)
            index = MailboxIndex(buf)
            index.verify()
        except (IndexCorrupt, ValueError, OSError) as exc:
            log.warning("ignoring index %s (%s); rebuilding it", path, exc)
            return None
    finally:
        os.close(fd)
    with _cache_lock:
        old = _cache.pop(maildir, None)
        if old is not None:
            _cache_bytes -= len(old[1].buf)
        _cache[maildir] = (stamp, index)
        _cache_bytes += len(buf)
        while len(_cache) > 1 and (len(_cache) > _CACHE_MAX or _cache_bytes > _CACHE_MAX_BYTES):
            _, (_, evicted) = _cache.popitem(last=False)
            _cache_bytes -= len(evicted.buf)
    return index


def _read_all(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return less for huge files
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise IndexCorrupt("file shrank while being read")
        data += more
    return data
