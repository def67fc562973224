"""Dovecot-compatible passwd-file user database.

Each line is ``user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields``;
everything after the password is optional, ``#`` starts a comment.  The file
is re-read when it changes (size or mtime), so ``fastpop user add`` takes
effect without a restart.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    password: str
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def parse_line(line: str) -> UserRecord | None:
    """One passwd-file line -> record; None for blank lines and comments."""
    line = line.rstrip("\r\n")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
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
        uid=int(uid) if uid else None,
        gid=int(gid) if gid else None,
        home=home or None,
        extra=extras,
    )


def format_record(rec: UserRecord) -> str:
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


class PasswdFile:
    """Read side: a dict of records, reloaded when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._users: dict[str, UserRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        st = os.stat(self.path)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rename-replace changes the inode
        if stamp == self._stamp:
            return False
        users: dict[str, UserRecord] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    rec = parse_line(line)
                except ValueError as exc:
                    raise ValueError(f"{self.path}:{lineno}: {exc}") from None
                if rec is not None:
                    users[rec.name] = rec
        self._users, self._stamp = users, stamp
        return True

    def reload(self) -> None:
        self._stamp = None
        self.reload_if_changed()

    def lookup(self, name: str) -> UserRecord | None:
        self.reload_if_changed()
        return self._users.get(name)

    def __len__(self) -> int:
        return len(self._users)


def read_records(path: str) -> list[UserRecord]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in (parse_line(line) for line in f) if r is not None]


def write_records(path: str, records: list[UserRecord]) -> None:
    """Replace the file atomically (temp file, fsync, rename), mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(format_record(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
