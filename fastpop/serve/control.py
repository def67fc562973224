"""The control socket: ``fastpop who``, ``kick``, ``deny``, ``allow`` and
``maintenance`` on a running server (docs/operations.md, "Live sessions").

A Unix stream socket (``[control] socket``, by default ``control.sock`` in
the runtime directory of the lock table), made before privileges are dropped,
mode 0600 (0660 with ``[control] group``): its file permissions decide who
may control the server.  A client sends one request, a JSON object on one
line of at most MAX_REQUEST bytes, within REQUEST_TIMEOUT seconds, and reads
one JSON object back; then the server closes the connection.  Anything else
(too long, too slow, not JSON, an unknown command) gets ``{"ok": false,
"error": ...}`` or a close, never more.

With ``--workers N`` the supervisor owns the socket, in a thread of its own
(its main thread waits for workers), and fans each request out to the workers
over one socketpair per worker, made at each fork: the simplest channel that
needs no second listener per worker, no directory to clean up and no
process-wide lock (a worker's end is an asyncio stream in its loop; a request
carries an id, so an answer that comes too late is recognised and dropped).
The supervisor keeps what must outlive a worker, the deny list and the
maintenance flag, and hands them to every worker it forks.  A single process
serves the socket in its event loop.

The deny list persists: one user name per line in ``[control] deny_file``
(default ``denied-users`` beside the auth secret, in the state directory),
replaced atomically (a temporary file, fsync, rename, fsync of the directory)
at every change, read at start before privileges are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import grp
import ipaddress
import itertools
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastpop.auth.authenticator import default_secret_path, valid_username
from fastpop.config import Config
from fastpop.net import close_stream
from fastpop.store.locking import default_table_path

log = logging.getLogger("fastpop.control")

MAX_REQUEST = 4096  # bytes of one request line
REQUEST_TIMEOUT = 5.0  # seconds a client has to send its request and take the answer
WORKER_TIMEOUT = 5.0  # seconds a worker has to answer the supervisor
MAX_REPLY = 256 * 1024 * 1024  # bytes of one worker's (or the server's) answer
MAX_CLIENTS = 8  # control connections served at once by a single process
COMMANDS = ("who", "kick", "deny", "allow", "maintenance", "status")
STATES = {0: "authorization", 1: "transaction", 2: "update", 3: "closed"}  # fastpop.session.state


class RequestError(ValueError):
    """A request the server refuses (its message goes back to the client)."""


class ControlInUse(OSError):
    """Another running fastpop serves the control socket's path."""


# ------------------------------------------------------------------ paths and settings


def default_socket_path(config: Config) -> str:
    """``control.sock`` in the runtime directory of the lock table (fastpop.store.locking)."""
    return os.path.join(os.path.dirname(os.path.abspath(config.mail_lock_table or default_table_path())),
                        "control.sock")


def socket_path(config: Config) -> str | None:
    """The control socket's path; None when ``[control] socket = "none"``."""
    if config.control_socket == "none":
        return None
    return config.control_socket or default_socket_path(config)


def deny_path(config: Config) -> str:
    return config.control_deny_file or os.path.join(os.path.dirname(config.auth_secret_file or
                                                                    default_secret_path()), "denied-users")


# ------------------------------------------------------------------ requests


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line, checked: RequestError says what is wrong with it."""
    if len(line) > MAX_REQUEST:
        raise RequestError(f"request longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("a request is one JSON object on one line") from None
    if not isinstance(request, dict):
        raise RequestError("a request is one JSON object on one line")
    command = request.get("cmd")
    if command not in COMMANDS:
        raise RequestError(f"unknown command; one of {', '.join(COMMANDS)}")
    out: dict[str, Any] = {"cmd": command}
    if command == "kick":
        target = request.get("target")
        if not isinstance(target, str) or not target or len(target) > 255:
            raise RequestError("kick needs a target: a user name or an address (or network)")
        out["target"] = target
    elif command in ("deny", "allow"):
        user = request.get("user")
        if not isinstance(user, str) or not valid_username(user) or "\n" in user:
            raise RequestError(f"{command} needs a valid user name")
        out["user"] = user
    elif command == "maintenance":
        on = request.get("on")
        if not isinstance(on, bool):
            raise RequestError("maintenance needs on: true or false")
        out["on"] = on
    return out


def _matcher(target: str):
    """kick's target: an address or network (the client's), else a user name."""
    try:
        net = ipaddress.ip_network(target, strict=False)
    except ValueError:
        return lambda user, peer: user == target
    def match(user: str | None, peer: str) -> bool:
        try:
            return ipaddress.ip_address(peer.partition("%")[0]) in net
        except ValueError:
            return False
    return match


# ------------------------------------------------------------------ in a serving process


@dataclass
class ControlState:
    """What the control socket sets, kept where it outlives one worker."""

    maintenance: bool = False
    denied: frozenset[str] = field(default_factory=frozenset)


@dataclass
class WorkerControl:
    """What a worker gets from its supervisor at the fork: its end of the
    channel and the state to start with."""

    channel: socket.socket
    state: ControlState
    index: int  # the worker's


def session_rows(ctx: Any, worker: int | None) -> list[dict[str, Any]]:
    """``who``: one row per open session of this process (ctx.sessions, which
    every session joins when it greets and leaves when it ends)."""
    loop_now, wall_now, pid = ctx.loop.time(), time.time(), os.getpid()
    rows = []
    for s in list(ctx.sessions):
        user = s._user
        since = wall_now - (loop_now - s._since)
        rows.append({
            "user": user.name if user is not None else None,
            "address": s._peer,
            "state": STATES.get(s._state, "unknown"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "since_epoch": round(since, 3),
            "worker": worker,
            "pid": pid,
            "bytes_sent": s._retr_bytes + s._top_bytes,
            "tls": bool(s._secure),
        })
    return rows


def apply(ctx: Any, request: dict[str, Any], worker: int | None = None) -> dict[str, Any]:
    """A checked request, applied in this process (a worker, or the single process)."""
    command = request["cmd"]
    if command == "who":
        return {"ok": True, "sessions": session_rows(ctx, worker)}
    if command == "kick":
        match = _matcher(request["target"])
        kicked = 0
        for s in list(ctx.sessions):
            user = s._user.name if s._user is not None else None
            if s.transport is not None and match(user, s._peer):
                log.info("kicked user=%s rip=%s", user or "-", s._peer)
                s.shutdown("kicked")  # [SYS/TEMP] and close: no UPDATE state, nothing deleted
                kicked += 1
        return {"ok": True, "kicked": kicked}
    if command == "deny":
        ctx.denied = ctx.denied | {request["user"]}
    elif command == "allow":
        ctx.denied = ctx.denied - {request["user"]}
    elif command == "maintenance":
        ctx.maintenance = request["on"]
    return {"ok": True, "maintenance": ctx.maintenance, "denied": sorted(ctx.denied)}


def change_state(state: Any, request: dict[str, Any], path: str) -> dict[str, Any]:
    """deny, allow, maintenance on the process that owns the socket (its
    ``state``: a ControlState, or the single process's context); the deny
    list saved at once.  The answer says when it could not be saved."""
    command = request["cmd"]
    reply: dict[str, Any] = {"ok": True}
    if command in ("deny", "allow"):
        old = state.denied
        state.denied = old | {request["user"]} if command == "deny" else old - {request["user"]}
        if state.denied != old:
            try:
                save_denied(path, state.denied)
            except OSError as exc:
                log.error("deny list not saved in %s: %s (applied until the server stops)", path, exc)
                reply["warning"] = f"not saved in {path}: {exc.strerror or exc}; applies until the server stops"
    elif command == "maintenance":
        state.maintenance = request["on"]
    reply.update(maintenance=state.maintenance, denied=sorted(state.denied))
    return reply


def audit(request: dict[str, Any], reply: dict[str, Any], uid: int | None) -> None:
    """Log what changed the server, and who (the client's uid, from the socket)."""
    command, by = request["cmd"], "-" if uid is None else uid
    if command == "kick":
        log.info("control: kick target=%s kicked=%s uid=%s", request["target"], reply.get("kicked"), by)
    elif command in ("deny", "allow"):
        log.info("control: %s user=%s uid=%s", command, request["user"], by)
    elif command == "maintenance":
        log.info("control: maintenance %s uid=%s", "on (new logins refused)" if request["on"] else "off", by)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    except (OSError, AttributeError, struct.error):
        return None


# ------------------------------------------------------------------ the deny list file


def load_denied(path: str) -> frozenset[str]:
    """The saved deny list (empty if there is none yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"deny file {path} is not a regular file")
        data = f.read(16 * 1024 * 1024)
    names = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return frozenset(n for n in names if n and not n.startswith("#") and valid_username(n))


def save_denied(path: str, users: frozenset[str]) -> None:
    """Replace the deny file atomically: whole or not at all, even on a crash."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    text = "# users refused by fastpop deny (fastpop allow USER removes one)\n" + "".join(
        f"{u}\n" for u in sorted(users))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ------------------------------------------------------------------ the socket


class ControlSocket:
    """The listening socket and the lock that says a server holds its path."""

    def __init__(self, config: Config) -> None:
        path = socket_path(config)
        assert path is not None
        self.path = path
        self.owner = os.getpid()
        self.sock, self._lock_fd = _bind(path, config.control_group)

    def close(self) -> None:
        """At the end of the server (by the process that made it)."""
        if os.getpid() != self.owner:
            return
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # (may fail once privileges are dropped: the next start removes it)
        except OSError:
            pass
        os.close(self._lock_fd)


def open_socket(config: Config) -> ControlSocket | None:
    """The control socket, before privileges are dropped; None when off.  At
    the default path, one held by another fastpop is a warning (that one keeps
    it); at a configured path it stops the start (ControlInUse)."""
    if socket_path(config) is None:
        return None
    try:
        return ControlSocket(config)
    except ControlInUse as exc:
        if config.control_socket:
            raise
        log.warning("%s: this server has no control socket (set [control] socket)", exc)
        return None


def _bind(path: str, group: str | None) -> tuple[socket.socket, int]:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        # whoever may write there may put their own socket in its place
        raise PermissionError(f"control socket directory {directory} must be a directory of uid {os.geteuid()} "
                              "(or root) that nobody else may write")
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ControlInUse(f"control socket {path} is another running fastpop's") from None
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket: not removed")
            os.unlink(path)  # a server that ended without removing it (its lock is free)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # never accessible to others, not even for an instant
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            if group is not None:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660 if group is not None else 0o600)
            # bound now, listening once the process that serves it has dropped privileges (as POP3's)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return sock, lock_fd


# ------------------------------------------------------------------ a single process: in its event loop


async def serve_socket(ctx: Any, control: ControlSocket, path: str) -> asyncio.AbstractServer:
    """Serve the control socket in this (single) process's loop."""
    clients = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        clients += 1
        try:
            if clients > MAX_CLIENTS:
                reply: dict[str, Any] = {"ok": False, "error": "too many control connections"}
            else:
                uid = peer_uid(writer.get_extra_info("socket"))
                reply = await _answer(reader, lambda req: _single(ctx, req, path, uid))
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass  # the client left or does not read: its loss
        except Exception:
            log.exception("control request failed")
        finally:
            clients -= 1
            await close_stream(writer)

    return await asyncio.start_unix_server(handle, sock=control.sock, limit=MAX_REQUEST + 2)  # (it listens)


async def _answer(reader: asyncio.StreamReader, handler) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        if not line.endswith(b"\n") and not reader.at_eof():
            raise RequestError("a request is one line")
        return handler(parse_request(line))
    except asyncio.TimeoutError:
        return {"ok": False, "error": f"no complete request within {REQUEST_TIMEOUT:g} s"}
    except (ValueError, asyncio.LimitOverrunError) as exc:  # (readline: a line over the limit is a ValueError)
        if isinstance(exc, RequestError):
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}


def _single(ctx: Any, request: dict[str, Any], path: str, uid: int | None) -> dict[str, Any]:
    if request["cmd"] in ("deny", "allow", "maintenance"):
        reply = change_state(ctx, request, path)
    else:
        reply = apply(ctx, request)
    if request["cmd"] == "status":
        reply["workers"] = 1
    audit(request, reply, uid)
    return reply


# ------------------------------------------------------------------ a worker: its end of the channel


async def serve_channel(ctx: Any, channel: socket.socket, worker: int) -> None:
    """Answer the supervisor's requests, one JSON line each, until it closes the channel."""
    reader, writer = await asyncio.open_connection(sock=channel, limit=MAX_REQUEST * 4)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            try:
                request = json.loads(line)
                reply = apply(ctx, parse_request(line), worker)
                reply["id"] = request.get("id")
            except Exception as exc:  # never the end of the worker
                log.error("control request from the supervisor failed: %r", exc)
                reply = {"ok": False, "error": "failed in the worker"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    except (OSError, ValueError):
        pass  # the supervisor is gone (the alive pipe stops the worker)
    finally:
        await close_stream(writer)


# ------------------------------------------------------------------ the supervisor: a thread


class SupervisorControl:
    """The control socket of a supervisor, served by a thread that accepts
    and a thread per client (at most MAX_CLIENTS, each bounded in time): a
    client that says nothing holds only its own thread; the requests reach
    the workers one at a time."""

    def __init__(self, control: ControlSocket, path: str, state: ControlState) -> None:
        self.control = control
        self.deny_path = path
        self.state = state
        self.lock = threading.Lock()  # state and channels: the main thread forks, this one serves
        self.channels: dict[int, socket.socket] = {}  # worker index -> the supervisor's end
        self._ids = itertools.count(1)
        self._fan_out_lock = threading.Lock()  # one request at a time on the channels
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def channel_for(self, index: int) -> WorkerControl:
        """Before forking worker ``index`` (with ``lock`` held, across the
        fork): a new channel, and the state the worker starts with."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        old = self.channels.pop(index, None)
        if old is not None:
            old.close()
        self.channels[index] = ours
        return WorkerControl(theirs, ControlState(self.state.maintenance, self.state.denied), index)

    def in_worker(self) -> None:
        """In a freshly forked worker: the supervisor's ends are not its own."""
        self.control.sock.close()
        for sock in self.channels.values():
            sock.close()
        os.close(self.control._lock_fd)

    def start(self) -> None:
        self.control.sock.listen(16)
        self._thread = threading.Thread(target=self._run, name="fastpop-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT + WORKER_TIMEOUT + 1)
        with self.lock:
            for sock in self.channels.values():
                sock.close()
            self.channels.clear()
        self.control.close()

    def _run(self) -> None:
        # The supervisor's signals are the main thread's (it blocks them around a fork).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                                                  signal.SIGCHLD})
        listener = self.control.sock
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([listener], [], [], 0.5)
                if not readable:
                    continue
                conn, _ = listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)  # out of descriptors, say: try again
                continue
            if not self._clients.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    conn.sendall(b'{"ok": false, "error": "too many control connections"}\n')
                conn.close()
                continue
            try:
                threading.Thread(target=self._client, args=(conn,), name="fastpop-control-client",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had
                self._clients.release()
                conn.close()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except Exception:
            log.exception("control request failed")
        finally:
            conn.close()
            self._clients.release()

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            line = _read_line(conn, MAX_REQUEST, deadline)
            request = parse_request(line)
            with self._fan_out_lock:
                reply = self._handle(request)
            audit(request, reply, peer_uid(conn))
        except RequestError as exc:
            reply = {"ok": False, "error": str(exc)}
        except TimeoutError:
            reply = {"ok": False, "error": f"no complete request within {REQUEST_TIMEOUT:g} s"}
        except OSError:
            return
        with contextlib.suppress(OSError):
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["cmd"]
        with self.lock:  # the state and the workers that get it change together (channel_for)
            if command in ("deny", "allow", "maintenance"):
                reply = change_state(self.state, request, self.deny_path)
            else:
                reply = {"ok": True}
            channels = dict(self.channels)
        if command == "status":
            reply.update(maintenance=self.state.maintenance, denied=sorted(self.state.denied),
                         workers=len(channels))
            return reply
        answers, errors = self._fan_out(request, channels)
        if command == "who":
            reply["sessions"] = [row for _, a in sorted(answers.items()) for row in a.get("sessions", ())]
        elif command == "kick":
            reply["kicked"] = sum(a.get("kicked", 0) for a in answers.values())
        if errors:
            reply["errors"] = errors
        return reply

    def _fan_out(self, request: dict[str, Any], channels: dict[int, socket.socket]
                 ) -> tuple[dict[int, dict[str, Any]], list[str]]:
        ident = next(self._ids)
        line = json.dumps({**request, "id": ident}).encode() + b"\n"
        deadline = time.monotonic() + WORKER_TIMEOUT
        answers: dict[int, dict[str, Any]] = {}
        errors = []
        sent = {}
        for index, sock in sorted(channels.items()):
            try:
                sock.settimeout(WORKER_TIMEOUT)
                sock.sendall(line)
                sent[index] = sock
            except OSError as exc:
                errors.append(f"worker {index}: {exc.strerror or exc}")
        for index, sock in sent.items():
            try:
                while True:  # an answer to an earlier request that timed out is dropped
                    answer = json.loads(_read_line(sock, MAX_REPLY, deadline))
                    if isinstance(answer, dict) and answer.get("id") == ident:
                        break
                if not answer.get("ok"):
                    errors.append(f"worker {index}: {answer.get('error')}")
                answers[index] = answer
            except (OSError, ValueError, RequestError) as exc:
                errors.append(f"worker {index}: no answer ({exc})")
        return answers, errors


def _read_line(sock: socket.socket, limit: int, deadline: float) -> bytes:
    """One line from a blocking socket, within ``limit`` bytes and ``deadline``
    (TimeoutError); what follows the line is never sent here (one request or
    answer at a time)."""
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(65536)  # (TimeoutError when it is over)
        if not chunk:
            if data:
                return bytes(data)  # a last line without its newline
            raise ConnectionResetError("closed")
        data += chunk
        end = data.find(b"\n")
        if end >= 0:
            return bytes(data[:end + 1])
        if len(data) > limit:
            raise RequestError(f"request longer than {limit} bytes")


# ------------------------------------------------------------------ the client (fastpop who, ...)


def request(path: str, message: dict[str, Any], timeout: float = REQUEST_TIMEOUT + WORKER_TIMEOUT + 5
            ) -> dict[str, Any]:
    """Send one request to the server at ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(message).encode() + b"\n")
        answer = json.loads(_read_line(sock, MAX_REPLY, time.monotonic() + timeout))
    if not isinstance(answer, dict):
        raise ValueError("the server's answer is not a JSON object")
    return answer
