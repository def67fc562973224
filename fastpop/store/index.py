"""The per-mailbox index: ``fastpop.index`` inside each Maildir, or one file
per mailbox in the ``[mail] index`` directory.

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
                           bit 1: measured, and no line starts with "."
     28  reserved     4 bytes
    name table: names and UIDLs, bytes, no separators

Only a set bit 1 says anything: a record without it (written before the bit
existed, or by anything else) means "may have lines starting with '.'",
which is always safe, so the version stays 1 and files of either kind are
read by either (records reused from an older index keep "unknown" until the
index is rebuilt from scratch).  A message with the bit goes out
in one sendfile(2) with no scan for dot lines (fastpop.session.sending).  The
bit is trusted like the rest of the file, and whoever can write the Maildir
can set it falsely, or rewrite a message in place after it was measured:
then RETR sends that one message's dot lines unstuffed, and a line "." ends
the response early, so that user's own client misreads its own session
(the rest of the message looks like replies to its next commands).  That
harms only the one who did it, in their own session, with their own mail:
the server parses nothing it sends, so its state and every other session are
unaffected, and nobody else can set the bit (mail from outside is measured by
fastpop itself; an index in the ``[mail] index`` directory is fastpop's
alone).  So the bit is not checked further.

It is written whole to a temporary file, fsync'ed and renamed over the old
one, so a crash leaves the old index or the new, never a mix; one that is
truncated, corrupt (checksum, or records that point outside the name table
or do not add up to the header's total), foreign or of another version is
rebuilt with a log line and never served.  No writer ever changes an index
file in place (only ``write`` writes one, always by rename), which is what
makes mapping them safe.

Reading: an index is memory-mapped (read-only, MAP_SHARED) when nobody but
this server's own uid (or root) can change the file: it belongs to this
process's effective uid, is not group- or world-writable, has one link, and
is either in the ``[mail] index`` directory or, in the Maildir, not owned by
the Maildir's own uid (a server running as root serving users' Maildirs).
Every worker then reads the same page-cache pages, with no copy per process
and nothing kept after the session but, for an index of 64 KiB or more, the
stamp it was validated under (so a warm login maps it without reading it
through); a mapping cannot be truncated under a session (SIGBUS) by a user
who cannot write the file, and a replacement by rename leaves the mapped
inode as it was.  (Over NFS, where a rename by another host removes the old
file at the server, the mailbox lock keeps every other host from writing
this index while a session maps it.)  Any other index file (one the
Maildir's owner can write: a server running as the mail's own uid) is read
into memory instead, into a bounded per-process cache, because its owner
could truncate it under a mapping and kill every session of the worker.
The ``[mail] index`` directory (see ``configure``) is how such stores get
mapped indexes, as Dovecot's INDEX=.

The file lies in the Maildir, so whoever can write the Maildir can write it:
it is checked as input from that user.  A name that is not one Maildir entry
(a "/", NUL, a leading dot, empty, over 255 bytes) or a UIDL that RFC 1939
does not allow (1-70 octets, 0x21-0x7E) fails validation like a bad checksum.
The temporary file has an unpredictable name and is created with
O_EXCL|O_NOFOLLOW in the Maildir's descriptor; the index itself is opened
with O_NOFOLLOW and must be a regular file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
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
_FLAGS = struct.Struct("<I")  # a record's flags, at 24
_FS_ENCODING = sys.getfilesystemencoding()  # names decode as os.fsdecode does
CHECKSUM_AT = 56
FLAG_STORED_AS_SENT = 1
FLAG_NO_DOT_LINES = 2

# Its user can write it: a larger file is not read (about 2 million messages fit).
MAX_INDEX_BYTES = 256 * 1024 * 1024
# By Maildir, while the file is unchanged: for an index read into memory (one
# its owner could truncate under a mapping), the copy, keyed by (inode, mtime,
# size); for a mapped one, only the stamp it was validated under (device,
# inode, size, mtime, ctime: only this uid or root can change it, and never in
# place), so a warm login maps it without checking it again.  A mapped index
# smaller than VERIFY_ALWAYS_BELOW is checked at each login instead (a few
# microseconds), so the stamps kept are those of large mailboxes only.
# Bounded in number, and the copies in bytes.
VERIFY_ALWAYS_BELOW = 64 * 1024
# A login's event loop reads (and checks) at most this much of an index file
# it has not seen unchanged before: whoever can write their Maildir can make
# the index as large as MAX_INDEX_BYTES, and reading and checking that held
# the event loop, so every session of the worker, at each login (139-159 ms
# for 129 MiB: benchmarks/loop_stall.py --attack index).  A
# larger index is loaded by the thread that opens the mailbox (about 9,000
# messages fit, and once in memory or validated the next login's stat suffices).
IN_LOOP_MOST = 1024 * 1024
_CACHE_MAX = 4096
_CACHE_MAX_BYTES = 256 * 1024 * 1024
_cache: OrderedDict[str, tuple[tuple[int, ...], MailboxIndex | None]] = OrderedDict()
_cache_bytes = 0
_cache_lock = threading.Lock()  # indexes are rebuilt in worker threads too

# [mail] index: (the directory, a descriptor of it) once configure() checked it
_directory: tuple[str, int] | None = None

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
    """Read side of one index file: bytes, or a read-only mapping of the file
    (``mapped``), which lives as long as this object."""

    __slots__ = ("buf", "count", "total_size", "cur_mtime_ns", "uidvalidity", "names_off", "mapped")

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
        self.mapped = isinstance(buf, mmap.mmap)

    def verify(self) -> None:
        """Checksum, then the records against the name table and the total:
        a file that passes can be served without further checks."""
        buf = self.buf
        stored = struct.unpack_from("<I", buf, CHECKSUM_AT)[0]
        with memoryview(buf) as view:  # (released at once: a mapping with a view left cannot be closed)
            crc = zlib.crc32(view[:CHECKSUM_AT])
            crc = zlib.crc32(b"\0\0\0\0", crc)
            crc = zlib.crc32(view[CHECKSUM_AT + 4 :], crc)
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

    def close(self) -> None:
        """Unmap a mapped index now rather than when its last reference goes
        (a session's end); nothing may read it afterwards."""
        if self.mapped:
            try:
                self.buf.close()
            except BufferError:  # a view of it is still alive: unmapped with it
                pass

    def flags(self, i: int) -> int:
        return _FLAGS.unpack_from(self.buf, HEADER.size + i * RECORD.size + 24)[0]

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


def configure(directory: str | None) -> None:
    """``[mail] index``: keep every index in ``directory``, one file per
    mailbox named from the hash of its canonical path, instead of in the
    Maildir; None puts them back in the Maildirs.

    The directory is created (0700) if missing and must be a directory of
    this process's effective uid that nobody else may write, not a link: run
    this as the uid that serves.  A descriptor of it is kept, so what was
    checked is what is used.  Raises PermissionError (or OSError) otherwise."""
    global _directory, _cache_bytes
    opened = None
    if directory is not None:
        path = os.path.abspath(directory)
        os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PermissionError(f"index directory {path} must be a directory, not a link or a file") from None
            raise
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            # whoever may write it may truncate a mapped index (SIGBUS) or plant one
            os.close(fd)
            raise PermissionError(f"index directory {path} must belong to uid {os.geteuid()} "
                                  "and be writable by nobody else")
        opened = (path, fd)
    old, _directory = _directory, opened
    if old is not None:
        os.close(old[1])
    with _cache_lock:
        _cache.clear()
        _cache_bytes = 0


def directory() -> str | None:
    """The ``[mail] index`` directory in use, or None (indexes in the Maildirs)."""
    return None if _directory is None else _directory[0]


def external_name(maildir: str) -> str:
    """The file name of a Maildir's index in the ``[mail] index`` directory:
    the SHA-256 of its canonical path, in hex (never a "/", a dot or a link)."""
    return hashlib.sha256(os.fsencode(safefs.canonical_maildir(maildir))).hexdigest()


def index_path(maildir: str) -> str:
    """Where the index of this Maildir is (for log lines, tools and tests)."""
    if _directory is not None:
        return _directory[0] + "/" + external_name(maildir)
    return maildir + "/" + INDEX_FILE


def write(maildir: str, entries: list[Entry], cur_mtime_ns: int, uidvalidity: int, dir_fd: int | None = None) -> None:
    """Replace the index crash-safely: temporary file, fsync, rename.
    ``dir_fd``: the Maildir, open (else it is opened here, never through a link).
    The caller holds the mailbox's session lock: one writer per mailbox."""
    data = encode(entries, cur_mtime_ns, uidvalidity)
    external = _directory
    if external is not None:
        name = external_name(maildir)
        # fastpop's own directory: nobody else can plant a name, and under the
        # session lock no other writer of this mailbox runs, so the name is fixed
        _replace(external[1], name, name + ".tmp", data, unlink_first=True)
    elif dir_fd is None:
        fd = safefs.open_nofollow(safefs.canonical_maildir(maildir), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return write(maildir, entries, cur_mtime_ns, uidvalidity, fd)
        finally:
            os.close(fd)
    else:
        # unpredictable and exclusive: nothing planted under this name is opened
        _replace(dir_fd, INDEX_FILE, f"{INDEX_FILE}.tmp.{secrets.token_hex(8)}", data)
    _forget(maildir)
    if faults.ACTIVE:
        faults.hit("index.after_rename")


def _replace(dir_fd: int, name: str, tmp: str, data: bytes, unlink_first: bool = False) -> None:
    """Write ``data`` to ``tmp`` (created O_EXCL|O_NOFOLLOW, 0600), fsync it
    and rename it over ``name``: the only way an index file is ever written."""
    if unlink_first:
        try:  # a crashed writer's
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            write_and_sync(fd, data)
        finally:
            os.close(fd)
        if faults.ACTIVE:
            faults.hit("index.before_rename")
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:  # a full disk must not keep a partial copy of the index as well
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _forget(maildir: str) -> None:
    global _cache_bytes
    with _cache_lock:
        old = _cache.pop(maildir, None)
        if old is not None and old[1] is not None:
            _cache_bytes -= len(old[1].buf)


def _remember(maildir: str, stamp: tuple[int, ...], index: MailboxIndex | None) -> None:
    global _cache_bytes
    with _cache_lock:
        old = _cache.pop(maildir, None)
        if old is not None and old[1] is not None:
            _cache_bytes -= len(old[1].buf)
        _cache[maildir] = (stamp, index)
        if index is not None:
            _cache_bytes += len(index.buf)
        while len(_cache) > 1 and (len(_cache) > _CACHE_MAX or _cache_bytes > _CACHE_MAX_BYTES):
            _, (_, evicted) = _cache.popitem(last=False)
            if evicted is not None:
                _cache_bytes -= len(evicted.buf)


def mappable(st: os.stat_result, maildir_owner: int | None, external: bool) -> bool:
    """Whether an index file may be mapped: nobody but this uid or root can
    write it (so nobody else can truncate it under a mapping), and it is not
    the Maildir owner's own (``maildir_owner``: None if unknown)."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022 or st.st_nlink != 1:
        return False
    return external or (maildir_owner is not None and maildir_owner >= 0 and st.st_uid != maildir_owner)


def load(maildir: str, dir_fd: int | None = None, owner: int | None = None,
         most: int | None = None) -> MailboxIndex | None:
    """The index of this Maildir if it is present and valid, else None.
    ``dir_fd``: the Maildir, open (else by its canonical path; never through a
    link).  ``owner``: the uid that owns the Maildir, if known (an index in
    the Maildir is mapped only if it is not that uid's: see the module doc).
    ``most``: read or check at most this many bytes of the file (the event
    loop's limit, IN_LOOP_MOST): a larger one not already in memory or
    validated gives None, for the caller to load it in a thread instead.

    A warm login costs a stat of a file read into memory before (same
    inode, mtime and size: the copy is used), or an open, an fstat and an
    mmap of one that is mapped (validated once per stamp); a damaged file is
    logged and left for the rebuild."""
    external = _directory
    if external is not None:
        dir_fd = external[1]
        name = external_name(maildir)
        path = external[0] + "/" + name  # (for log lines)
    else:
        name = INDEX_FILE
        path = maildir + "/" + INDEX_FILE
    try:  # the warm path of a copy: one system call
        if dir_fd is None:  # (the Maildir's parents are the operator's; a link below is refused on open)
            st = os.stat(safefs.canonical_maildir(maildir) + "/" + name, follow_symlinks=False)
        else:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    with _cache_lock:
        cached = _cache.get(maildir)
        if cached is not None:
            if cached[1] is not None and cached[0] == (st.st_ino, st.st_mtime_ns, st.st_size):
                _cache.move_to_end(maildir)
                return cached[1]
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
        log.warning("ignoring index %s (not a regular file, or over %d bytes); rebuilding it", path, MAX_INDEX_BYTES)
        return None
    try:
        if dir_fd is None:
            fd = safefs.open_nofollow(safefs.canonical_maildir(maildir) + "/" + name, safefs.O_MESSAGE)
        else:
            fd = os.open(name, safefs.O_MESSAGE, dir_fd=dir_fd)
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
        try:
            if mappable(st, owner, external is not None) and st.st_size >= HEADER.size:
                stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                unchecked = cached is None or cached[1] is not None or cached[0] != stamp
                if unchecked and most is not None and st.st_size > most:
                    return None
                index = _map(fd, st.st_size)
                if index is not None:
                    if unchecked:
                        index.verify()
                        if st.st_size >= VERIFY_ALWAYS_BELOW:
                            _remember(maildir, stamp, None)
                        elif cached is not None:
                            _forget(maildir)
                    return index
            if most is not None and st.st_size > most:
                return None
            buf = _read_all(fd, st.st_size)
            index = MailboxIndex(buf)
            index.verify()
        except (IndexCorrupt, ValueError, OSError) as exc:
            log.warning("ignoring index %s (%s); rebuilding it", path, exc)
            return None
    finally:
        os.close(fd)
    _remember(maildir, (st.st_ino, st.st_mtime_ns, st.st_size), index)
    return index


def _map(fd: int, size: int) -> MailboxIndex | None:
    """The index mapped read-only and shared, or None if it cannot be (no
    address space, too many mappings: then it is read instead)."""
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError:
        return None
    try:
        return MailboxIndex(mapping)
    except BaseException:
        mapping.close()
        raise


def _read_all(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return less for huge files
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise IndexCorrupt("file shrank while being read")
        data += more
    return data
