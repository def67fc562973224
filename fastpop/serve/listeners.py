"""Claims on the addresses a generation of fastpop listens on, so that a
second fastpop cannot bind beside a running one (SO_REUSEPORT would let it,
and the kernel would split the connections between them): flock(2) on files
in the runtime directory, inherited by every worker."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import stat
import time

from fastpop.config import Config
from fastpop.net import listening_socket, parse_address, resolve_listener
from fastpop.store.locking import default_table_path


def bind_listener(locks: ListenerLocks, addr: str, port: int | None = None) -> socket.socket:
    """A socket for ``addr`` as ``listening_socket`` makes one, bound but not
    listening: it accepts once the process that serves it starts serving
    (after its switch of user), not in the kernel's queue before.  Its address
    is claimed in ``locks`` first (port 0: the port the kernel chose, once bound)."""
    family, _, _, sockaddr = resolve_listener(addr, port)
    if sockaddr[1]:
        locks.claim(family, sockaddr, addr)
    sock = listening_socket(addr, port, listen=False)
    if not sockaddr[1]:
        try:
            locks.claim(family, sock.getsockname(), addr)
        except BaseException:
            sock.close()
            raise
    return sock


class ListenerInUse(OSError):
    """Another fastpop (or the workers it left) serves an address this one would listen on."""


class ListenerLocks:
    """One generation per port.  The listening sockets have SO_REUSEPORT, so
    the kernel lets a second fastpop bind beside a running one (or beside the
    workers of one whose supervisor died) and splits the connections between
    them.  Instead, each TCP address fastpop binds is claimed with flock(2) on
    files in the runtime directory (the lock table's: /run/fastpop as root):
    a specific address takes its own file exclusively and its port's file
    shared, a wildcard one (0.0.0.0, ::) its port's file exclusively, as the
    kernel would refuse the same binds without SO_REUSEPORT.  The descriptors
    are opened by the process that binds (the supervisor, or the single
    process) and inherited by every worker it forks, so the claim holds as
    long as any process of the generation lives, whatever ended the others;
    close-on-exec keeps programs they run out of it."""

    def __init__(self, config: Config) -> None:
        self.directory = os.path.dirname(os.path.abspath(config.mail_lock_table or default_table_path()))
        self.owner = os.getpid()
        self._held: dict[str, tuple[int, int]] = {}  # file name -> (descriptor, LOCK_SH or LOCK_EX)
        self._checked = False

    def claim_addresses(self, addresses: list[str]) -> None:
        """Every address each of ``addresses`` with a fixed port resolves to (as
        the event loop binds a name: all of them); port 0 is claimed once bound."""
        for addr in addresses:
            host, port = parse_address(addr)
            if not port:
                continue
            for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE):
                if family in (socket.AF_INET, socket.AF_INET6):
                    self.claim(family, sockaddr, addr)

    def claim(self, family: int, sockaddr: tuple, shown: str) -> None:
        """Claim one bound (or about to be bound) TCP address; ListenerInUse if
        another generation holds it."""
        if family not in (socket.AF_INET, socket.AF_INET6):
            return
        host, port = sockaddr[0], sockaddr[1]
        kind = "tcp6" if family == socket.AF_INET6 else "tcp4"
        port_file = f"listen-{kind}-{port}.lock"
        if ipaddress.ip_address(host.partition("%")[0]).is_unspecified:
            self._lock(port_file, fcntl.LOCK_EX, shown)
        else:
            self._lock(port_file, fcntl.LOCK_SH, shown)
            self._lock(f"listen-{kind}-{host}-{port}.lock", fcntl.LOCK_EX, shown)

    def _directory(self) -> str:
        if not self._checked:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            st = os.lstat(self.directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                # whoever may write there may take every port's claim
                raise PermissionError(f"runtime directory {self.directory} must be a directory of uid "
                                      f"{os.geteuid()} (or root) that nobody else may write")
            self._checked = True
            self._sweep()
        return self.directory

    def _sweep(self) -> None:
        """Remove the claims of generations that were killed (nobody holds them)."""
        for name in os.listdir(self.directory):
            if not (name.startswith("listen-") and name.endswith(".lock")):
                continue
            path = os.path.join(self.directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, path):
                    os.unlink(path)
            except OSError:
                pass  # held: a generation serves it
            finally:
                os.close(fd)

    def _lock(self, name: str, mode: int, shown: str) -> None:
        held = self._held.get(name)
        if held is not None and (held[1] == fcntl.LOCK_EX or mode == fcntl.LOCK_SH):
            return  # this generation has it already
        path = os.path.join(self._directory(), name)
        pid = None
        # A few tries: a generation removing the file of one that ended holds it for an instant
        # (then it is gone: open it again); a generation that serves holds it for good.
        for _ in range(5):
            fd = held[0] if held is not None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                                          0o600)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                if held is None:
                    os.close(fd)
                time.sleep(0.02)
                continue
            if held is None and not _same_file(fd, path):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)  # what it says is an earlier holder's
            if mode == fcntl.LOCK_EX:
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held[name] = (fd, mode)
            return
        raise ListenerInUse(
            f"{shown} is served by another fastpop{f' (pid {pid}, or the workers it started)' if pid else ''}:"
            " stop it first (its workers finish their sessions within its shutdown_timeout); "
            f"claimed in {path}")

    def release(self) -> None:
        """At the end of the generation (its creator, every worker gone):
        remove the files nobody else holds, close the rest."""
        if os.getpid() != self.owner:
            return
        for name, (fd, mode) in self._held.items():
            path = os.path.join(self.directory, name)
            try:
                if mode == fcntl.LOCK_EX:
                    os.ftruncate(fd, 0)  # no pid of a process that is gone, if it cannot be removed
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, path):
                    os.unlink(path)
            except OSError:
                pass  # shared with another generation's address, or no longer ours to remove (privileges dropped)
            os.close(fd)
        self._held.clear()


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
