"""A local Dovecot (Debian's dovecot-pop3d) serving bench's generated Maildirs.

Configured from ``dovecot.conf.in`` beside this file: passwd-file auth with
PLAIN passwords, Maildir, the high-performance process settings
(``service_count = 0``, processes started ahead of need), no auth penalty.
It runs as root in the foreground (``dovecot -F -c FILE``) on free loopback
ports, in its own base_dir, with mail processes as ``vmail`` (created if
missing; the mailboxes are chowned to it).  ``tls=True`` adds ``ssl = yes``
with a self-signed certificate made by openssl and an implicit-TLS
listener; STLS is then offered on the plain port.

``DovecotProxy`` is the same Dovecot configured from ``dovecot-proxy.conf.in``
as a POP3 proxy only: its passdb checks each password and answers
``proxy=y host=... port=...``, so the login process forwards the session to
another POP3 server (benchmarks/proxy_relay.py --dovecot-proxy).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fastpop.bench.spawn import Seeded, free_port

TEMPLATE = Path(__file__).with_name("dovecot.conf.in")
PROXY_TEMPLATE = Path(__file__).with_name("dovecot-proxy.conf.in")
MAIL_USER = "vmail"


def unavailable() -> str | None:
    """Why a local Dovecot cannot be run here, or None if it can."""
    if shutil.which("dovecot") is None and not os.path.exists("/usr/sbin/dovecot"):
        return "Dovecot is not installed (apt-get install dovecot-pop3d)"
    if os.geteuid() != 0:
        return "running Dovecot for the comparison needs root"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} is missing (reinstall dovecot-core)"
    return None


def dovecot_binary() -> str:
    return shutil.which("dovecot") or "/usr/sbin/dovecot"


def version() -> str:
    try:
        out = subprocess.run([dovecot_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def ensure_mail_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", MAIL_USER], check=True)
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give ``path`` and everything below to Dovecot's mail user."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
            except FileNotFoundError:
                pass  # renamed meanwhile (new/ to cur/, flags) by a server: it keeps its owner


def stop_dovecot(proc: subprocess.Popen) -> int:
    """SIGTERM to a foreground Dovecot, SIGKILL to its process group after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def start_dovecot(conf: Path, configure: Callable[[], None], ready: Callable[[], bool], log: Callable[[], str],
                  timeout: float = 30.0) -> subprocess.Popen:
    """``dovecot -F -c conf`` in its own session, once ``ready()``.  Before
    each try ``configure()`` picks free ports and writes ``conf``: a port
    taken between its choice and Dovecot's bind makes another try (3 at most).
    ``log()`` is Dovecot's log so far; its stderr goes to stderr.log beside ``conf``."""
    stderr = conf.parent / "stderr.log"
    for attempt in range(3):
        configure()
        offset = len(log())
        with open(stderr, "ab") as err:  # (the child has its own copy)
            proc = subprocess.Popen([dovecot_binary(), "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                return proc
            time.sleep(0.05)
        said = log()[offset:] + stderr.read_text(errors="replace")
        stop_dovecot(proc)
        if "in use" not in said or attempt == 2:
            raise RuntimeError(f"Dovecot did not start:\n{said[-3000:]}")
    raise AssertionError("not reached")


def greets(port: int, greeting: bytes) -> bool:
    """Whether a server on 127.0.0.1:``port`` sends a line starting with ``greeting``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(64).startswith(greeting)
    except OSError:
        return False


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


class DovecotServer:
    template = TEMPLATE

    def __init__(self, seeded: Seeded, directory: Path | None = None, tls: bool = False) -> None:
        self.seeded = seeded
        self.dir = Path(directory or seeded.root / "dovecot")
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.tls_port = 0
        self.cert: Path | None = None
        self.conf = self.dir / "dovecot.conf"
        self.version = version()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return f"Dovecot {self.version} (pid {self.pid})"

    def log(self) -> str:
        try:
            return (self.dir / "dovecot.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _substitutions(self) -> dict[str, str]:
        ssl = "ssl = no"
        listener = ""
        if self.tls:
            if self.cert is None:
                self.cert, self.key = make_certificate(self.dir)
            ssl = f"ssl = yes\nssl_cert = <{self.cert}\nssl_key = <{self.key}"
            if os.path.exists("/usr/share/dovecot/dh.pem"):
                ssl += "\nssl_dh = </usr/share/dovecot/dh.pem"
            listener = f"  inet_listener pop3s {{\n    port = {self.tls_port}\n    ssl = yes\n  }}\n"
        return {
            "@DIR@": str(self.dir),
            "@MAILROOT@": str(self.seeded.mailroot),
            "@PASSWD@": str(self.seeded.passwd),
            "@MAIL_USER@": MAIL_USER,
            "@PORT@": str(self.port),
            "@CPUS@": str(max(1, len(os.sched_getaffinity(0)))),
            "@TLS_LISTENER@": listener,
            "@SSL@": ssl,
        }

    def _write_config(self) -> None:
        text = self.template.read_text()
        for key, value in self._substitutions().items():
            text = text.replace(key, value)
        self.conf.write_text(text)

    def _prepare(self) -> None:
        """Let the mail processes (as the mail user) reach and write the Maildirs."""
        for parent in [self.seeded.mailroot, *self.seeded.mailroot.parents]:
            if not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"Dovecot's users cannot reach {self.seeded.mailroot}: {parent} is not "
                                   f"traversable by others (chmod o+x, or generate under /tmp)")
        uid, gid = ensure_mail_user()
        chown_tree(self.seeded.mailroot, uid, gid)
        self.seeded.passwd.chmod(0o644)

    def start(self, timeout: float = 30.0) -> None:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        self._prepare()
        def configure() -> None:
            self.port = free_port()
            self.tls_port = free_port() if self.tls else 0
            self._write_config()

        self.proc = start_dovecot(self.conf, configure, lambda: greets(self.port, b"+OK"), self.log, timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = stop_dovecot(self.proc)
        self.proc = None
        return rc

    def __enter__(self) -> DovecotServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class DovecotProxy(DovecotServer):
    """Dovecot as a POP3 proxy only, in front of another POP3 server.

    Its passwd-file carries the seeded users' {PLAIN} passwords with the extra
    fields ``proxy=y host=HOST port=PORT``: the proxy checks the password
    itself, then its login process connects to HOST:PORT, logs in there with
    the same USER/PASS and relays.  No mail process ever runs, so nothing is
    chowned; the backend must know the same passwords (``seeded.passwd``).
    """

    template = PROXY_TEMPLATE

    def __init__(self, seeded: Seeded, backend_port: int, backend_host: str = "127.0.0.1",
                 directory: Path | None = None) -> None:
        super().__init__(seeded, directory or seeded.root / "dovecot-proxy")
        self.backend_host = backend_host
        self.backend_port = backend_port
        self.passwd = self.dir / "proxy.passwd"

    def describe(self) -> str:
        return f"Dovecot {self.version} proxy (pid {self.pid})"

    def _substitutions(self) -> dict[str, str]:
        return {**super()._substitutions(), "@PASSWD@": str(self.passwd)}

    def login_settings(self) -> str:
        """The pop3-login service's settings as written (for a benchmark's output), e.g.
        ``service_count = 0, process_min_avail = 2, client_limit = 10000``."""
        block = re.search(r"^service pop3-login \{\n(.*?)^\}", self.conf.read_text(), re.M | re.S)
        if block is None:
            return "?"
        body = re.sub(r"^\s*inet_listener.*?^\s*\}\n", "", block.group(1), flags=re.M | re.S)
        return ", ".join(line.strip() for line in body.splitlines() if line.strip())

    def _prepare(self) -> None:
        ensure_mail_user()  # the userdb's uid, which Dovecot's config check wants to exist
        extra = f"proxy=y host={self.backend_host} port={self.backend_port}"
        # user:password:uid:gid:gecos:home:shell:extra_fields, the passwords seeded.passwd gives the backend
        self.passwd.write_text("".join(f"{name}:{{PLAIN}}{password}::::::{extra}\n"
                                       for name, password in [*self.seeded.users, *self.seeded.large_users]))
        self.passwd.chmod(0o644)  # read by the auth process, as Dovecot's internal user
