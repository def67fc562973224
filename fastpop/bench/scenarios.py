"""What a session does: scenarios as generators of POP3 commands.

A scenario yields ``(line, label, kind)`` tuples (see ``client.py``) and is
sent each reply: the status line for a one-line reply, the list of lines for
CAPA/LIST/UIDL, the delivered size for RETR (already verified).  It returns
how many messages it deleted, so the worker can put as many back.

    login            connect, authenticate, QUIT
    stat             ... STAT, QUIT                      (the login+STAT session)
    download         ... UIDL, RETR every message, QUIT  (leave mail on the server)
    download-delete  ... UIDL, RETR and DELE every message, QUIT; re-seeded after
    retr-large       ... LIST, RETR the largest message, QUIT
    idle             ... then hold the session open (NOOP every --idle-noop s), QUIT at the end
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpop.bench.client import (
    HOLD,
    L_AUTH,
    L_DELE,
    L_GREETING,
    L_LIST,
    L_NOOP,
    L_PASS,
    L_QUIT,
    L_RETR,
    L_STAT,
    L_STLS,
    L_TLS,
    L_UIDL,
    L_USER,
    MESSAGE,
    MULTI,
    SINGLE,
    SessionError,
    auth_plain_line,
)

SCENARIOS = ("login", "stat", "download", "download-delete", "retr-large", "idle", "mixed")
DEFAULT_MIX = {"login": 10.0, "stat": 50.0, "download": 40.0}

GREETING = (None, L_GREETING, SINGLE)
STLS = (b"STLS\r\n", L_STLS, SINGLE)
TLS_UPGRADE = (None, L_TLS, SINGLE)
STAT = (b"STAT\r\n", L_STAT, SINGLE)
UIDL = (b"UIDL\r\n", L_UIDL, MULTI)
LIST = (b"LIST\r\n", L_LIST, MULTI)
NOOP = (b"NOOP\r\n", L_NOOP, SINGLE)
QUIT = (b"QUIT\r\n", L_QUIT, SINGLE)
HOLD_CMD = (None, L_NOOP, HOLD)
_RETR = [(b"RETR %d\r\n" % i, L_RETR, MESSAGE) for i in range(1, 1001)]
_DELE = [(b"DELE %d\r\n" % i, L_DELE, SINGLE) for i in range(1, 1001)]


def retr(n: int) -> tuple:
    return _RETR[n - 1] if 0 < n <= 1000 else (b"RETR %d\r\n" % n, L_RETR, MESSAGE)


def dele(n: int) -> tuple:
    return _DELE[n - 1] if 0 < n <= 1000 else (b"DELE %d\r\n" % n, L_DELE, SINGLE)


class User:
    """A mailbox's credentials with its login commands encoded once."""

    __slots__ = ("name", "password", "login")

    def __init__(self, name: str, password: str, auth: str) -> None:
        self.name = name
        self.password = password
        if auth == "plain":
            self.login: tuple = ((auth_plain_line(name, password), L_AUTH, SINGLE),)
        else:
            self.login = (
                (b"USER " + name.encode() + b"\r\n", L_USER, SINGLE),
                (b"PASS " + password.encode() + b"\r\n", L_PASS, SINGLE),
            )

    def __getitem__(self, i: int) -> str:  # (name, password) for messages
        return (self.name, self.password)[i]


@dataclass
class Options:
    starttls: bool = False
    releasing: bool = False  # idle: the worker is ending the hold


def _login(user: User, opts: Options):
    yield GREETING
    if opts.starttls:
        yield STLS
        yield TLS_UPGRADE
    # (not yield from: the replies sent in would go to the tuple's iterator, which takes none)
    for command in user.login:  # noqa: UP028
        yield command


def _numbers(lines: list[bytes], command: str) -> list[int]:
    try:
        return [int(line.split(None, 1)[0]) for line in lines]
    except (ValueError, IndexError):
        raise SessionError("protocol", f"{command}: malformed listing line") from None


def login(user: User, opts: Options):
    yield from _login(user, opts)
    yield QUIT
    return 0


def stat(user: User, opts: Options):
    yield from _login(user, opts)
    line = yield STAT
    parts = line.split()
    if len(parts) < 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        raise SessionError("protocol", f"STAT: malformed reply {line[:60]!r}")
    yield QUIT
    return 0


def download(user: User, opts: Options):
    yield from _login(user, opts)
    numbers = _numbers((yield UIDL), "UIDL")
    for n in numbers:
        yield retr(n)
    yield QUIT
    return 0


def download_delete(user: User, opts: Options):
    yield from _login(user, opts)
    numbers = _numbers((yield UIDL), "UIDL")
    for n in numbers:
        yield retr(n)
    for n in numbers:
        yield dele(n)
    yield QUIT
    return len(numbers)


def retr_large(user: User, opts: Options):
    yield from _login(user, opts)
    lines = yield LIST
    best, best_size = 0, -1
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
            raise SessionError("protocol", "LIST: malformed listing line")
        if int(parts[1]) > best_size:
            best, best_size = int(parts[0]), int(parts[1])
    if best:
        yield retr(best)
    yield QUIT
    return 0


def idle(user: User, opts: Options):
    yield from _login(user, opts)
    while True:
        yield HOLD_CMD
        if opts.releasing:
            break
        yield NOOP
    yield QUIT
    return 0


FUNCTIONS = {
    "login": login,
    "stat": stat,
    "download": download,
    "download-delete": download_delete,
    "retr-large": retr_large,
    "idle": idle,
}


def parse_mix(text: str) -> dict[str, float]:
    """'login=1,stat=3,download=5' -> weights (only non-idle scenarios)."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, sep, weight = item.strip().partition("=")
        if name not in FUNCTIONS or name == "idle":
            known = ", ".join(s for s in FUNCTIONS if s != "idle")
            raise ValueError(f"--mix: unknown scenario {name!r} (one of {known})")
        try:
            mix[name] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: weight of {name} must be a number") from None
        if mix[name] < 0:
            raise ValueError("--mix: weights must not be negative")
    if not sum(mix.values()) > 0:
        raise ValueError("--mix: weights add up to zero")
    return mix
