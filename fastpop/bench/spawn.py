"""Generated mailboxes, and a local fastpop serving them.

``seed()`` writes Maildirs directly (CRLF, ``S=``/``W=`` in the names, as an
MTA with ``mail_save_crlf`` would), a Dovecot passwd-file with ``{PLAIN}``
passwords, and a users file (``name password`` per line) for the load
generator.  Every message carries ``X-Fastpop-Bench-Sha256``: the SHA-256 of
its body as a correct RETR sends it (dot-stuffed, RFC 1939); bench checks it
on every RETR (client.MessageReader).

``SpawnedServer`` runs ``python -m fastpop serve`` on a free loopback port
over such a tree and stops it again.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHECKSUM_HEADER = b"X-Fastpop-Bench-Sha256"
LARGE_PREFIX = "large"
USER_PREFIX = "bench"

_WORDS = (
    "pop3 maildir server client message mailbox octets session latency uvloop cython dovecot "
    "stuffing terminator capability transaction authorization update delete retrieve list "
    "unique identifier listing throughput histogram percentile coordinated omission fastpop"
).split()


# ------------------------------------------------------------------ sizes


def parse_size(text: str) -> int:
    """'3700', '4k', '10M', '1.5MiB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class SizeDistribution:
    """Message sizes: ``N`` fixed, ``A-B`` uniform, ``lognormal:MEDIAN[:SIGMA]``."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> SizeDistribution:
        if text.startswith("lognormal:"):
            parts = text.split(":")
            sigma = float(parts[2]) if len(parts) > 2 else 1.0
            return cls("lognormal", parse_size(parts[1]), sigma)
        if "-" in text:
            lo, hi = text.split("-", 1)
            a, b = parse_size(lo), parse_size(hi)
            if b < a:
                raise ValueError(f"size range {text!r}: upper bound below lower bound")
            return cls("uniform", a, b)
        return cls("fixed", parse_size(text))

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(300, min(int(rng.lognormvariate(0, self.b) * self.a), 64 * 1024**2))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.a)} B"
        if self.kind == "uniform":
            return f"uniform {int(self.a)}-{int(self.b)} B"
        return f"lognormal median {int(self.a)} B sigma {self.b}"


# ------------------------------------------------------------------ messages


def _line_pool(rng: random.Random) -> list[bytes]:
    pool = []
    for i in range(256):
        words = []
        length = 0
        while length < 60:
            w = rng.choice(_WORDS)
            words.append(w)
            length += len(w) + 1
        line = " ".join(words)
        if i % 16 == 5:
            line = "." + line  # dot-stuffed in transit: the checksum catches a server that forgets
        elif i % 16 == 9:
            line = "." * 2 + line
        pool.append(line.encode() + b"\r\n")
    pool.append(b"\r\n")
    return pool


class MessageFactory:
    """Deterministic messages of a given size with the bench checksum header."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.pool = _line_pool(random.Random(seed ^ 0x5EED))

    def message(self, user: str, n: int, size: int) -> bytes:
        head = (
            f"From: fastpop bench <bench@fastpop.invalid>\r\n"
            f"To: {user}@fastpop.invalid\r\n"
            f"Subject: bench message {n} for {user}\r\n"
            f"Message-ID: <{n}.{user}.{self.rng.getrandbits(48):x}@fastpop.invalid>\r\n"
        ).encode()
        body_size = max(2, size - len(head) - len(CHECKSUM_HEADER) - 68 - 2)
        first = f"message {n} of {user}\r\n".encode()
        parts = [first]
        length = len(first)
        pool, rng = self.pool, self.rng
        while length < body_size:
            line = pool[rng.getrandbits(8)]
            parts.append(line)
            length += len(line)
        body = b"".join(parts)
        if length > body_size:  # trim to size, keeping CRLF line ends
            body = body[: body_size - 2].rstrip(b"\r") + b"\r\n"
        # the body as RETR sends it: every line that starts with "." gets another
        digest = hashlib.sha256((b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]).hexdigest().encode()
        return head + CHECKSUM_HEADER + b": " + digest + b"\r\n\r\n" + body


_seq = 0


def deliver(maildir: str, data: bytes, subdir: str = "new", owner: tuple[int, int] | None = None) -> str:
    """Write one message the way an MTA does (tmp/, then rename); returns its path."""
    global _seq
    _seq += 1
    name = f"{int(time.time())}.M{_seq}P{os.getpid()}.fastpop-bench,S={len(data)},W={len(data)}"
    tmp = os.path.join(maildir, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    target = os.path.join(maildir, subdir, name + (":2," if subdir == "cur" else ""))
    os.rename(tmp, target)
    return target


@dataclass
class SeedSpec:
    mailboxes: int = 200
    messages: int = 20
    size: SizeDistribution = field(default_factory=lambda: SizeDistribution("fixed", 3700))
    large_mailboxes: int = 0
    large_size: int = 10 * 1024**2
    seed: int = 1


@dataclass
class Seeded:
    root: Path
    mailroot: Path
    passwd: Path
    users_file: Path
    users: list[tuple[str, str]]
    large_users: list[tuple[str, str]]
    spec: SeedSpec

    @property
    def mail_location(self) -> str:
        return str(self.mailroot) + "/%u"


def seed(root: str | os.PathLike, spec: SeedSpec) -> Seeded:
    """Create ``root``/mail/<user>/{cur,new,tmp}, ``root``/passwd, ``root``/users."""
    root = Path(root)
    mailroot = root / "mail"
    mailroot.mkdir(parents=True, exist_ok=True)
    factory = MessageFactory(spec.seed)
    rng = factory.rng
    users: list[tuple[str, str]] = []
    large: list[tuple[str, str]] = []
    width = max(4, len(str(max(spec.mailboxes, spec.large_mailboxes))))

    def make_user(name: str) -> tuple[str, str]:
        password = f"pw{rng.getrandbits(40):x}"
        maildir = mailroot / name
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        return name, password

    for i in range(1, spec.mailboxes + 1):
        name, password = make_user(f"{USER_PREFIX}{i:0{width}d}")
        md = str(mailroot / name)
        for n in range(1, spec.messages + 1):
            deliver(md, factory.message(name, n, spec.size.sample(rng)), "cur")
        users.append((name, password))
    for i in range(1, spec.large_mailboxes + 1):
        name, password = make_user(f"{LARGE_PREFIX}{i:0{width}d}")
        deliver(str(mailroot / name), factory.message(name, 1, spec.large_size), "cur")
        large.append((name, password))
    passwd = root / "passwd"
    users_file = root / "users"
    everyone = users + large
    passwd.write_text("".join(f"{n}:{{PLAIN}}{p}::::::\n" for n, p in everyone))
    users_file.write_text("".join(f"{n} {p}\n" for n, p in everyone))
    return Seeded(root, mailroot, passwd, users_file, users, large, spec)


def read_users(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A users file: ``name password`` per line; blank lines and # comments skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, password = line.partition(" ")
            if not sep or not password.strip():
                raise ValueError(f"{path}:{lineno}: expected 'name password'")
            out.append((name, password.strip()))
    if not out:
        raise ValueError(f"{path}: no users")
    return out


# ------------------------------------------------------------------ a local fastpop


class SpawnedServer:
    """``python -m fastpop serve`` on 127.0.0.1 and a free port, over a seeded tree."""

    def __init__(self, seeded: Seeded, parser: str = "cython", loop: str = "uvloop",
                 log_level: str = "info", extra_args: list[str] | None = None,
                 package_root: str | None = None, name: str = "fastpop") -> None:
        """``package_root``: run the fastpop of another checkout (with its extensions
        built in place), e.g. an earlier commit's for a before/after comparison."""
        if log_level not in ("debug", "info"):
            raise ValueError("the spawned server logs at info or debug: its start-up line carries the port")
        self.seeded = seeded
        self.parser = parser
        self.loop = loop
        self.log_level = log_level
        self.extra_args = list(extra_args or [])
        self.package_root = package_root or str(Path(__file__).resolve().parents[2])
        self.name = name
        # not beside the passwd-file: a fastpop before e33eae9 watched that directory for writes and
        # was woken by every log line written there, its own and those of the servers it is compared with
        self.log_path = seeded.root / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.parser_impl = "?"
        self.loop_impl = "?"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return f"fastpop (parser: {self.parser_impl}, loop: {self.loop_impl}, pid {self.pid})"

    def start(self, timeout: float = 20.0) -> None:
        env = dict(os.environ)
        env.pop("FASTPOP_NO_EXTENSIONS", None)
        # the fastpop this bench is part of (or the one asked for), not whatever
        # "fastpop" resolves to elsewhere
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.package_root, env.get("PYTHONPATH")]))
        if self.parser == "python":
            env["FASTPOP_NO_EXTENSIONS"] = "1"
        cli_text = Path(self.package_root, "fastpop", "cli.py").read_text()  # (an older checkout's flags)
        args = [
            sys.executable, "-m", "fastpop", "serve",
            "--listen", "127.0.0.1:0",
            "--passwd-file", str(self.seeded.passwd),
            "--mail-location", self.seeded.mail_location,
            "--loop", self.loop,
            # info, not warning: the start-up line carries the port, and a real
            # deployment logs every session, as Dovecot does.
            "--log-level", self.log_level,
            # one process unless asked (extra_args win): on a small machine the
            # generator needs the other cores
            "--workers", "1",
            *self.extra_args,
            # its own seeded mailboxes, which only this user writes (a checkout older
            # than the flag served mail as root without being told)
            *(["--allow-mail-as-root"] if os.geteuid() == 0 and "--user" not in self.extra_args
              and "allow-mail-as-root" in cli_text else []),
            # its own control socket: as root the default (/run/fastpop/control.sock) is one per host,
            # and a bench may run two servers at once (compare_dovecot --baseline)
            *(["--control-socket", str(self.seeded.root / f"{self.name}.control.sock")]
              if "--control-socket" not in self.extra_args and "control-socket" in cli_text else []),
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL, cwd=self.seeded.root)
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(parser: (\w+), loop: (\w+)")
        while time.monotonic() < deadline:
            m = pattern.search(self.log())
            if m:
                self.port = int(m.group(1))
                self.parser_impl, self.loop_impl = m.group(2), m.group(3)
                return
            if self.proc.poll() is not None:
                raise RuntimeError("fastpop exited at start:\n" + self.log()[-2000:])
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("fastpop did not start in time:\n" + self.log()[-2000:])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def __enter__(self) -> SpawnedServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def make_workdir(prefix: str = "fastpop-bench-", parent: str | None = None) -> Path:
    """A fresh directory that other users (Dovecot's vmail) may traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    return path


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for servers that need one up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
