"""Dovecot-compatible passwd-file user database.

Each line is ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``;
everything after the password is optional, ``#`` starts a comment.  The file
is re-read when it changes (inode, size or mtime), so ``fastpop user add``
takes effect without a restart.  A server watches it with inotify(7)
(``watch``): a login then costs no system call for it, and a change made on
this host is seen by the next login; a stat at most once a second (every
login without a watch) also catches what inotify cannot see (an edit on
another NFS host).

Reading is forgiving the way Dovecot's is: a malformed line (no user name, a
uid or gid that is not a number, bytes that are not UTF-8, a NUL) is logged
once per (re)load and skipped, and so is a second line for a user already
seen (the first one counts); every other user still logs in.

Writing is strict: ``:`` separates the fields and a line ends at a newline,
and nothing can escape either, so a field that holds a ``:`` where the format
has no room for one, or a control character anywhere, is refused
(``ValueError``), never written.  A hashed password never holds either; a
``{PLAIN}`` password that does must be stored hashed instead.  Rewriting the
file changes only the lines of the users that changed: comments, blank lines
and lines it cannot parse stay as they were, where they were.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("fastpop.auth")

# Malformed lines logged one by one on a (re)load; past this, one summary line.
MAX_LOGGED_PROBLEMS = 20

# C0 controls, DEL, C1 controls (NEL among them) and the Unicode line and
# paragraph separators: no field may hold one (a line reader of any kind
# could split there, and a C reader stops at NUL).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _number(text: str, what: str) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        # never the value itself: a broken line may hold part of a password here
        raise ValueError(f"{what} is not a number")
    return int(text)


def parse_line(line: str) -> UserRecord | None:
    """One passwd-file line -> record; None for blank lines and comments.
    ValueError (saying which field, never its value) for a malformed line."""
    return _parse(line.rstrip("\r\n"))


def _parse(line: str) -> UserRecord | None:
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    if "\0" in line:
        raise ValueError("NUL character in the line")
    parts = line.split(":", 7)
    parts += [""] * (8 - len(parts))
    name, password, uid, gid, _gecos, home, _shell, extra = parts
    if not name:
        raise ValueError("empty user name")
    extras: dict[str, str] = {}
    for item in extra.split():
        key, _, value = item.partition("=")
        extras[key] = value
    return UserRecord(
        name=name,
        password=password,
        uid=_number(uid, "uid"),
        gid=_number(gid, "gid"),
        home=home or None,
        extra=extras,
    )


# ----------------------------------------------------------------- writing


def _check_text(value: str, what: str, colon: bool = False, space: bool = True) -> None:
    """Refuse what would change the line's structure; the message never
    quotes the value (it may be a password)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text")
    if _CONTROL.search(value):
        raise ValueError(f"{what} cannot contain a newline or other control character")
    if not colon and ":" in value:
        raise ValueError(f"{what} cannot contain ':' (the passwd-file's field separator)")
    if not space and any(c.isspace() for c in value):
        raise ValueError(f"{what} cannot contain white space (it separates the extra fields)")


def check_record(rec: UserRecord) -> None:
    """ValueError unless ``format_record(rec)`` is one line that reads back as ``rec``."""
    _check_text(rec.name, "a user name")
    if not rec.name:
        raise ValueError("empty user name")
    if rec.name[0] == "#" or rec.name[0].isspace():
        raise ValueError(f"user name {rec.name!r}: a line starting with '#' or white space is a comment or blank")
    who = f"user {rec.name}"
    _check_text(rec.password, f"{who}: the password field")
    for what, number in (("uid", rec.uid), ("gid", rec.gid)):
        if number is not None and (type(number) is not int or number < 0):
            raise ValueError(f"{who}: the {what} must be a number, 0 or more")
    if rec.home is not None:
        _check_text(rec.home, f"{who}: the home directory")
    for key, value in rec.extra.items():
        _check_text(key, f"{who}: an extra field's name", colon=True, space=False)
        if "=" in key:
            raise ValueError(f"{who}: an extra field's name cannot contain '='")
        _check_text(value, f"{who}: the extra field {key}", colon=True, space=False)


def format_record(rec: UserRecord) -> str:
    """The record as one line (no newline); ValueError if it cannot be one."""
    check_record(rec)
    extra = " ".join(f"{k}={v}" if v else k for k, v in rec.extra.items())
    fields = [
        rec.name,
        rec.password,
        "" if rec.uid is None else str(rec.uid),
        "" if rec.gid is None else str(rec.gid),
        "",
        rec.home or "",
        "",
        extra,
    ]
    while len(fields) > 2 and not fields[-1]:
        fields.pop()
    return ":".join(fields)


# ----------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class Problem:
    """A line skipped when reading: where, whose (when the name could be read), why."""
    lineno: int
    name: str | None
    reason: str

    def describe(self, path: str) -> str:
        who = f" (user {self.name!r})" if self.name else ""
        return f"{path}:{self.lineno}{who}: {self.reason}"


def _shown(name: str | None) -> str | None:
    """The first field of a broken line, if it looks like a user name (it is
    logged: never a long or strange one, which could be anything)."""
    if not name or len(name) > 255 or _CONTROL.search(name) or "\ufffd" in name:
        return None
    return name


def _entries(data: bytes) -> Iterator[tuple[int, bytes, UserRecord | None, Problem | None]]:
    """(line number, the line's bytes, record or None, problem or None) for
    every line; a record and a problem are never both set."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the last line
    for lineno, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            name = line.split(b":", 1)[0].decode("utf-8", "replace") if b":" in line else None
            yield lineno, raw, None, Problem(lineno, _shown(name), "not UTF-8")
            continue
        try:
            rec = _parse(text)
        except ValueError as exc:
            name = text.split(":", 1)[0] if ":" in text else None
            yield lineno, raw, None, Problem(lineno, _shown(name), str(exc))
            continue
        yield lineno, raw, rec, None


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# With a watch: how long a stat of the file stands for it when inotify reports
# nothing (inotify sees no change made by another host of a network filesystem).
CHECK_INTERVAL = 1.0

_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_Q_OVERFLOW, _IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
_IN_ONLYDIR, _IN_DONT_FOLLOW = 0x01000000, 0x02000000
# The directory is watched for names only: a watch of it for writes would
# report every write to any file in it (a log file beside the passwd-file
# woke every worker at every session's log line).  The file's own inode is
# watched for writes, and watched anew whenever a name event shows it replaced.
_DIRECTORY_MASK = (_IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
                   | _IN_ONLYDIR)
_FILE_MASK = _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_DONT_FOLLOW
_LOST = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED  # of the directory's watch: it is gone or moved
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class _Watch:
    """inotify(7) on the directory of the file (a rename over it, a removal)
    and on the file itself (an edit in place, a chmod), read by an asyncio
    event loop.  ``changed()`` is called when an event concerns the file,
    the queue overflowed or the directory itself went (then the watch ends:
    ``alive`` is False)."""

    def __init__(self, path: str, loop, changed) -> None:
        self.path = os.fsencode(path)
        self.name = os.path.basename(self.path)
        self.loop = loop
        self.changed = changed
        self.alive = False
        self._libc = libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        try:
            self._directory_wd = libc.inotify_add_watch(fd, os.path.dirname(self.path), _DIRECTORY_MASK)
            if self._directory_wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), os.path.dirname(path))
            self._file_wd = -1
            self._watch_file()
            loop.add_reader(fd, self._read)
        except BaseException:
            os.close(fd)
            raise
        self.alive = True

    def _watch_file(self) -> None:
        """Watch the inode the name holds now (none if it is gone: its
        creation is a name event, which calls this again)."""
        wd = self._libc.inotify_add_watch(self.fd, self.path, _FILE_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.ENOTDIR):
                raise OSError(err, os.strerror(err), os.fsdecode(self.path))
        if self._file_wd >= 0 and wd != self._file_wd:
            self._libc.inotify_rm_watch(self.fd, self._file_wd)  # the replaced inode's (EINVAL if gone: fine)
        self._file_wd = wd

    def _read(self) -> None:
        hit = lost = renamed = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                lost = True
                break
            if not data:
                break
            at = 0
            while at + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + length].rstrip(b"\0")
                at += _EVENT.size + length
                if wd == self._directory_wd:
                    if mask & _LOST:
                        lost = True
                    elif name == self.name:
                        hit = renamed = True
                elif mask & _IN_Q_OVERFLOW:
                    hit = renamed = True  # events were dropped: a replacement among them, perhaps
                elif wd == self._file_wd:
                    hit = True
                # (else the watch of a file since replaced: its IN_IGNORED, or a late event)
        if renamed and not lost:
            try:
                self._watch_file()  # before the next stat, so no later edit of the new file goes unseen
            except OSError:
                lost = True  # (the watch limit reached: a stat at every login from now on)
        if lost:
            self.close()
        if hit or lost:
            self.changed()

    def close(self) -> None:
        if self.alive:
            self.alive = False
            self.loop.remove_reader(self.fd)
            os.close(self.fd)


class PasswdFile:
    """Read side: a dict of records, reloaded when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._users: dict[str, UserRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._watch: _Watch | None = None
        self._fresh_until = 0.0  # with a watch: the last stat stands for the file until then (monotonic)
        self.reload_if_changed()

    def watch(self, loop) -> bool:
        """Have ``loop`` watch the file with inotify, so a login need not
        stat it (see the module's docstring).  False, and a stat per login
        as before, where it cannot: no inotify, its limit reached, or a link
        in the file's path (a change of the link's target would go unseen)."""
        if self._watch is not None:
            return True
        path = os.path.abspath(self.path)
        if os.path.realpath(path) != path:
            return False
        try:
            self._watch = _Watch(path, loop, self._changed)
        except (OSError, AttributeError) as exc:  # (AttributeError: a libc without inotify)
            log.info("not watching passwd-file %s (%s): it is checked at every login", path, exc)
            return False
        self._fresh_until = 0.0
        return True

    def unwatch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _changed(self) -> None:
        self._fresh_until = 0.0  # the next lookup stats the file
        if self._watch is not None and not self._watch.alive:
            self._watch = None  # its directory went: a stat at every login from now on

    def reload_if_changed(self) -> bool:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rename-replace changes the inode
        if self._watch is not None:  # (a failed stat or read above or below leaves it stale: checked again)
            self._fresh_until = time.monotonic() + CHECK_INTERVAL
        if stamp == self._stamp:
            return False
        self._fresh_until = 0.0  # until the file is read
        users: dict[str, UserRecord] = {}
        first_line: dict[str, int] = {}
        problems: list[Problem] = []
        for lineno, _raw, rec, problem in _entries(_read_bytes(self.path)):
            if problem is not None:
                problems.append(problem)
            elif rec is not None:
                if rec.name in users:
                    problems.append(Problem(lineno, rec.name, f"the user is on line {first_line[rec.name]} already "
                                                              "(the first line counts)"))
                else:
                    users[rec.name] = rec
                    first_line[rec.name] = lineno
        for problem in problems[:MAX_LOGGED_PROBLEMS]:
            log.error("passwd-file line skipped: %s", problem.describe(self.path))
        if len(problems) > MAX_LOGGED_PROBLEMS:
            log.error("passwd-file %s: %d more lines skipped", self.path, len(problems) - MAX_LOGGED_PROBLEMS)
        self._users, self._stamp = users, stamp
        if self._watch is not None:
            self._fresh_until = time.monotonic() + CHECK_INTERVAL
        return True

    def reload(self) -> None:
        self._stamp = None
        self.reload_if_changed()

    def lookup(self, name: str) -> UserRecord | None:
        if self._watch is None or time.monotonic() >= self._fresh_until:
            self.reload_if_changed()
        return self._users.get(name)

    def __len__(self) -> int:
        return len(self._users)

    @property
    def users(self) -> dict[str, UserRecord]:
        """Every record, by name (a new dict after each read of the file: not to be changed)."""
        return self._users


def check_master_file(path: str) -> None:
    """The master users' passwd-file ([auth] master_passwd_file): whoever can
    write it can make a master, who can read every mailbox.  ValueError unless
    it is a regular file of root or this uid that nobody else may write; a
    warning when others may read it (its hashes are worth guessing offline)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"[auth] master_passwd_file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"[auth] master_passwd_file {path} is not a regular file")
    if st.st_uid not in (0, os.geteuid()):
        raise ValueError(f"[auth] master_passwd_file {path} belongs to uid {st.st_uid}: it must be root's "
                         f"or uid {os.geteuid()}'s")
    if st.st_mode & 0o022:
        raise ValueError(f"[auth] master_passwd_file {path} is mode {stat.S_IMODE(st.st_mode):04o}: others may "
                         f"write it, and so make a master user (chmod go-w {path})")
    if st.st_mode & 0o004:
        log.warning("master passwd-file %s is readable by every local user (chmod o-r)", path)


def read_records(path: str, problems: list[Problem] | None = None) -> list[UserRecord]:
    """Every record of the file, in order (a user's second line too); the
    lines that cannot be read are skipped and, with ``problems``, listed."""
    if not os.path.exists(path):
        return []
    records = []
    for _lineno, _raw, rec, problem in _entries(_read_bytes(path)):
        if rec is not None:
            records.append(rec)
        elif problem is not None and problems is not None:
            problems.append(problem)
    return records


def write_records(path: str, records: list[UserRecord]) -> None:
    """Make the file's users ``records``, in this order: the n-th line of a
    user in the file becomes the n-th record of that name (unchanged records
    keep their line as written), lines of users no longer in ``records`` go,
    new records go at the end; comments, blank lines and unreadable lines
    stay where they are.  The file is replaced atomically (temp file, fsync,
    rename), mode 0600.  ValueError, and the file untouched, if a record
    cannot be written as one line (``check_record``)."""
    out: list[bytes] = []
    used: dict[str, int] = {}
    by_name: dict[str, list[UserRecord]] = {}
    for rec in records:
        by_name.setdefault(rec.name, []).append(rec)
    existing = _read_bytes(path) if os.path.exists(path) else b""
    for _lineno, raw, old, _problem in _entries(existing):
        if old is None:  # comment, blank or unreadable: kept as it is
            out.append(raw)
            continue
        mine = by_name.get(old.name, ())
        n = used.get(old.name, 0)
        if n >= len(mine):
            continue  # the user (or this line of it) was removed
        used[old.name] = n + 1
        new = mine[n]
        out.append(raw if new == old else format_record(new).encode("utf-8"))
    seen: dict[str, int] = {}
    for rec in records:
        n = seen.get(rec.name, 0)
        seen[rec.name] = n + 1
        if n >= used.get(rec.name, 0):
            out.append(format_record(rec).encode("utf-8"))
    data = b"".join(line + b"\n" for line in out)

    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=directory)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


def _naming(exc: OSError, path: str) -> OSError:
    """``exc`` about the file the user named, not the temporary one written first."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, path)
