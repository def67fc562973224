"""systemd integration, by hand (no libsystemd): sd_notify and socket activation.

**Notifications** (``Type=notify``): a datagram to ``$NOTIFY_SOCKET`` (a path,
or an abstract name written with a leading ``@``).  fastpop sends
``READY=1`` once its listeners are open, ``STOPPING=1`` when SIGTERM/SIGINT
arrives, ``STATUS=...`` lines saying what it does, and, when the unit sets
``WatchdogSec=`` (``$WATCHDOG_USEC``), ``WATCHDOG=1`` at half that interval:
from the event loop in a single process (a stuck loop stops the pings), from
the supervisor of ``--workers N`` while all its workers are running.  Without
``$NOTIFY_SOCKET`` all of this does nothing.

**Socket activation** (``fastpop.socket``): when ``$LISTEN_PID`` is this
process, the ``$LISTEN_FDS`` sockets from fd 3 on are used instead of binding.
Each is matched to a kind of listener by its name (``FileDescriptorName=`` in
the socket unit, passed as ``$LISTEN_FDNAMES``): ``pop3s`` serves implicit TLS
(as ``[tls] listen``), ``lmtp`` is ignored with a warning (LMTP listeners are
always bound by fastpop), any other name (systemd's default is the socket
unit's name) serves POP3 (as ``[server] listen``).  The configured addresses
of a kind that received sockets are not bound; a kind that received none binds
as configured.  With ``--workers N`` the supervisor hands the same inherited
sockets to every worker: they share one accept queue (no SO_REUSEPORT).  The
variables are removed from the environment once read, so nothing started
later takes the sockets for its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("fastpop.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify(3) for one process; every method is a no-op without a socket."""

    def __init__(self, environ: dict | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or ""
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address if address and address[0] in "/\0" else None
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
        if self.address is None or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=value``) in one datagram; False if it could not go."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str = "Stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


def take_notifier() -> Notifier:
    """The process's Notifier; removes the variables, so that worker
    processes forked afterwards (and anything they run) do not notify."""
    notifier = Notifier()
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    return notifier


class LoopWatchdog:
    """From an event loop: WATCHDOG=1 at half of WATCHDOG_USEC, and a STATUS=
    line (``status()``) with each ping, or every STATUS_INTERVAL seconds."""

    STATUS_INTERVAL = 10.0

    def __init__(self, notifier: Notifier, loop, status: Callable[[], str] | None = None) -> None:
        self.notifier = notifier
        self.loop = loop
        self.status = status
        self.watchdog = notifier.watchdog_interval is not None
        self.interval = notifier.watchdog_interval or self.STATUS_INTERVAL
        self._timer = None
        if notifier.enabled and (self.watchdog or status is not None):
            self._timer = loop.call_later(0 if self.watchdog else self.interval, self._tick)

    def _tick(self) -> None:
        lines = ["WATCHDOG=1"] if self.watchdog else []
        if self.status is not None:
            lines.append(f"STATUS={self.status()}")
        self.notifier.notify(*lines)
        self._timer = self.loop.call_later(self.interval, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def listen_fds(environ: dict | None = None, unset: bool = True) -> list[tuple[int, str]]:
    """The sockets passed by systemd (sd_listen_fds_with_names): (fd, name) pairs."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    n = int(count)
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((fd, labels[i]))
    return out


class Activated:
    """Inherited listening sockets, sorted by the listener kind they serve."""

    def __init__(self, fds: list[tuple[int, str]]) -> None:
        self.pop3: list[socket.socket] = []
        self.tls: list[socket.socket] = []
        for fd, name in fds:
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM:
                log.warning("socket activation: fd %d (%s) is not a stream socket; ignored", fd, name)
                sock.detach()
                continue
            sock.setblocking(False)
            if name == "pop3s":
                self.tls.append(sock)
            elif name == "lmtp":
                log.warning("socket activation: fd %d named lmtp ignored (LMTP listeners are bound by fastpop)", fd)
                sock.detach()
            else:
                self.pop3.append(sock)

    def __bool__(self) -> bool:
        return bool(self.pop3 or self.tls)


def activated_sockets() -> Activated | None:
    """The inherited sockets of this process, or None when not socket-activated."""
    fds = listen_fds()
    if not fds:
        return None
    activated = Activated(fds)
    return activated if activated else None
