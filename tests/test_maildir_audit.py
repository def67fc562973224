"""Issue 16, item 5: random hostile Maildirs, and strace watching every path fastpop touches.

One real fastpop (tests/support/server.py ServerProcess, --workers 1) runs for the
module with ``strace -f -y -xx`` attached to all its threads, tracing the
system calls that open, create, remove, rename, link or change a file (not the
stat family).  Hypothesis builds a Maildir for a fresh user per example out of
regular messages, symlinks (to files and directories outside the Maildir, to
another user's mail, to ``..``, dangling), FIFOs, directories where message
files belong, files/FIFOs/symlinks where cur/ new/ tmp/ or the Maildir itself
belong, a ``fastpop.index`` that is random bytes or a well-formed index (format
version 1, checksum right, cur/'s mtime recorded so it would be trusted) naming
``../../../outside/secret``, absolute paths, names with "/" or NUL, and the
names of the planted symlinks and FIFOs, plus symlinked or FIFO
``dovecot-uidlist``/``maildirsize`` and a symlink where the index temporary
of this server's pid would go.  A POP3 session then logs in (an -ERR is fine),
runs STAT, LIST, UIDL, RETR of every listed message, DELE of all and QUIT.

After each example, the trace lines of that example are parsed (``<unfinished
...>``/``<... resumed>`` joined per thread) into the paths touched: the path
strace shows for a returned descriptor (the real file opened), else the
directory descriptor's path (or the cwd) joined with the name, its parent
resolved as the kernel would.  Allowed:

* anything below the attacked user's Maildir (and the Maildirs of earlier
  examples, whose sessions may still finish in this window: none of the
  generated attacks point there), read or write;
* the host's lock table (fastpop.store.locking.default_table_path()) and its shards, read or write;
* read-only: the passwd file, the server log, /etc, /usr, /lib*, /proc, /sys,
  /dev/null, /dev/urandom, Python's prefixes and site-packages and the fastpop
  package itself (a session touched only the passwd file and
  /sys/devices/system/cpu/online when this was written: the rest is for lazy
  imports and name service lookups);
* O_PATH opens of the directories *above* the Maildir: how fastpop/store/safefs.py
  walks down to it where openat2(2) is missing (a descriptor to walk from; a
  read open of those directories, which lists them, is a failure).

Everything else is a failure: in particular the ``outside`` directory next to
mail/ (secret files, a directory, a complete Maildir) and the ``victim`` user's
Maildir, whose contents carry marker strings that must never appear in a reply.
The example also fails if an outside file or the victim's mail changed, a
symlink/FIFO/directory planted in cur/ or new/ was moved or removed (issue 16:
"never moved, never deleted"), the session hung (3 s socket timeouts), the
server died or stops answering a control user's login and RETR, or its log has
a Traceback.

Ownership: the tests run as root here, so the tree is root's and the server
runs as root with --allow-mail-as-root (conftest adds it): the configuration in
which the kernel protects nothing and only the storage layer stands between a
Maildir's owner and the host.  As another user, the same runs as that user.

Repeatable: derandomized Hypothesis, no example database, no shrinking (each
example is a real session under strace; the failing example is printed as
found).  Explicit examples cover each attack of the issue first.  About 15 s on
two cores.  Skipped without strace or where ptrace is not permitted.

Blind spots: file operations submitted through io_uring (libuv can, for its own
uv_fs calls; fastpop makes none) and the stat family, which is not traced.
Today's code opens FIFOs without O_NONBLOCK; the test opens every FIFO it
planted for writing after each session so a stuck reader wakes (EOF) and the
run goes on, and reports the hang.
"""

from __future__ import annotations

import dataclasses
import os
import poplib
import re
import shutil
import signal
import site
import stat
import struct
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import pytest
from support.server import ServerProcess, message, tracer_of

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastpop  # noqa: E402
from fastpop.store.locking import default_table_path  # noqa: E402

needs_strace = pytest.mark.skipif(shutil.which("strace") is None,
                                  reason="strace is not installed (Debian package strace; scripts/test installs it)")

TIMEOUT = 3.0  # every socket operation of a session: a hang fails the example, never the CI job
MAX_RETR = 12  # messages fetched per session at most

# System calls that reach a file by name or create/remove/rename/link/change one.
# "?": not an error where the architecture lacks the call (aarch64 has no open(2)).
TRACED = ("open", "openat", "openat2", "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2",
          "link", "linkat", "symlink", "symlinkat", "mkdir", "mkdirat", "mknod", "mknodat", "rmdir",
          "truncate", "chmod", "fchmodat", "chown", "lchown", "fchownat", "utimensat", "utimes", "utime",
          "futimesat", "setxattr", "lsetxattr", "removexattr", "lremovexattr")


# --------------------------------------------------------------------------- strace output

_HEXSTR = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_HEXFD = re.compile(r"<((?:\\x[0-9a-f]{2})+)>")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<((?:\\x[0-9a-f]{2})*)>)?$")
_LINE = re.compile(r"^(\d+) +(.*)$")
_RESUMED = re.compile(r"^<\.\.\. ([a-z0-9_]+) resumed>(.*)$")
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND", "O_TMPFILE")


def _unhex(text: str) -> str:
    return os.fsdecode(bytes.fromhex(text.replace("\\x", "")))


def readable(line: str) -> str:
    """A -xx trace line with its strings and descriptor paths decoded, for messages."""
    line = _HEXSTR.sub(lambda m: repr(_unhex(m.group(1))), line)
    return _HEXFD.sub(lambda m: "<" + _unhex(m.group(1)) + ">", line)


def _fd_path(text: str) -> str | None:
    """The path strace -y shows for a descriptor argument or result, if it is a file."""
    m = _FD.match(text.strip())
    if m is None or m.group(2) is None:
        return None
    path = _unhex(m.group(2))
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return path if path.startswith("/") else None


def _string(text: str) -> str | None:
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        return _unhex(text[1:-1])
    return None  # NULL, or a pointer strace could not read


def _split_call(text: str) -> tuple[str, list[str], str | None] | None:
    """'name(a, b, {c, d}) = ret' -> (name, [a, b, {c, d}], ret); ret None if unfinished."""
    m = re.match(r"([a-z0-9_]+)\(", text)
    if m is None:
        return None
    name, i, start, depth, args = m.group(1), m.end(), m.end(), 0, []
    while i < len(text):
        c = text[i]
        if c == '"':  # with -xx a string holds only \xNN: no quote or comma inside
            j = text.find('"', i + 1)
            i = len(text) if j < 0 else j + 1
            continue
        if c == "<":  # a descriptor's path, hex as well
            j = text.find(">", i + 1)
            i = len(text) if j < 0 else j + 1
            continue
        if c in "{[(":
            depth += 1
        elif c in "}])":
            if depth == 0 and c == ")":
                args.append(text[start:i].strip())
                rest = text[i + 1:]
                r = re.search(r"=\s+(.*)$", rest)
                return name, [a for a in args if a], (r.group(1).strip() if r else None)
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    args.append(text[start:].strip())  # unfinished: no closing parenthesis yet
    return name, [a for a in args if a], None


def _real(path: str) -> str:
    """Where a name-based call lands: the parent resolved as the kernel resolves it
    (symlinks, ".."), the last component itself not followed."""
    stripped = path.rstrip("/") or "/"
    head, tail = os.path.split(stripped)
    if tail in ("", ".", ".."):
        return os.path.realpath(stripped)
    return os.path.join(os.path.realpath(head or "/"), tail)


@dataclasses.dataclass
class Access:
    line: str  # as strace wrote it (-xx)
    syscall: str
    path: str  # absolute, resolved as well as can be told
    write: bool
    result: str | None
    o_path: bool = False  # an O_PATH open: a handle to walk from, neither read nor written

    def __str__(self) -> str:
        kind = "WRITE" if self.write else "read"
        return f"{kind} {self.path!r} by: {readable(self.line)}"


def _at(args: list[str], fd_i: int, name_i: int, cwd: str) -> str | None:
    """Path named by (dirfd, name) arguments."""
    if name_i >= len(args):
        return None
    name = _string(args[name_i])
    base = _fd_path(args[fd_i]) if fd_i < len(args) else None
    if name is None:  # utimensat(fd, NULL, ...): the descriptor itself
        return base
    if name.startswith("/"):
        return name
    base = base or cwd
    return base if name == "" else base.rstrip("/") + "/" + name


def accesses(line: str, call: str, cwd: str) -> list[Access]:
    """The file-system accesses one complete (or still unfinished) call made."""
    parsed = _split_call(call)
    if parsed is None:
        return []
    name, args, ret = parsed
    paths: list[str | None] = []
    write = True
    flags = ""
    if name in ("open", "creat"):
        paths = [_at(["AT_FDCWD"] + args, 0, 1, cwd)]
        flags = args[1] if len(args) > 1 and name == "open" else ""
        write = name == "creat" or any(f in flags for f in _WRITE_FLAGS)
    elif name in ("openat", "openat2"):
        paths = [_at(args, 0, 1, cwd)]
        flags = args[2] if len(args) > 2 else ""  # openat2: the struct open_how, flags= inside
        write = any(f in flags for f in _WRITE_FLAGS)
    elif name in ("unlink", "rmdir", "mkdir", "mknod", "truncate", "chmod", "chown", "lchown", "utimes",
                  "utime", "setxattr", "lsetxattr", "removexattr", "lremovexattr"):
        paths = [_at(["AT_FDCWD"] + args, 0, 1, cwd)]
    elif name in ("unlinkat", "mkdirat", "mknodat", "fchmodat", "fchownat", "utimensat", "futimesat"):
        paths = [_at(args, 0, 1, cwd)]
    elif name in ("rename", "link"):
        paths = [_at(["AT_FDCWD"] + args, 0, 1, cwd), _at(["AT_FDCWD"] + args[1:], 0, 1, cwd)]
    elif name in ("renameat", "renameat2", "linkat"):
        paths = [_at(args, 0, 1, cwd), _at(args, 2, 3, cwd)]
    elif name == "symlink":  # the target is the link's content, not a path reached
        paths = [_at(["AT_FDCWD"] + args, 0, 2, cwd)]
    elif name == "symlinkat":
        paths = [_at(args, 1, 2, cwd)]
    else:
        return []
    opened = _fd_path(ret.split(" ", 1)[0]) if name in ("open", "openat", "openat2", "creat") and ret else None
    out = []
    for p in paths:
        if p is None:
            continue
        # An open that succeeded: the file it gave is the truth (strace read it
        # from /proc); anything else: where the kernel resolved (or would have
        # resolved) the name.
        real = opened if opened is not None else _real(p)
        out.append(Access(line, name, real, write, ret, "O_PATH" in flags))
    return out


class Tracer:
    """strace -f attached to a running process, read in windows."""

    def __init__(self, pid: int, out: Path, cwd: str) -> None:
        self.out = out
        self.cwd = cwd
        self._offset = 0
        self._partial = b""
        self._pending: dict[str, str] = {}  # tid -> the unfinished call's text
        self.err = open(out.with_suffix(".err"), "w+b")  # a file, not a pipe nobody drains
        self.proc = subprocess.Popen(
            ["strace", "-f", "-y", "-xx", "-qq", "-s", "65536", "-e", "signal=none",
             "-e", "trace=" + ",".join("?" + s for s in TRACED), "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=self.err,
        )
        deadline = time.monotonic() + 10
        while True:
            tasks = os.listdir(f"/proc/{pid}/task")
            if tasks and all(tracer_of(pid, t) == self.proc.pid for t in tasks):
                break
            if self.proc.poll() is not None:
                self.err.seek(0)
                err = self.err.read().decode(errors="replace").strip()
                pytest.skip(f"strace cannot attach here (ptrace not permitted?): {err}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.skip("strace did not attach within 10 s")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches from every thread, flushes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()

    def settle(self, quiet: float = 0.15, limit: float = 3.0) -> None:
        """Wait until the trace has not grown for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now = self.out.stat().st_size if self.out.exists() else 0
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.03)

    def skip_to_end(self) -> None:
        """Start a window: forget what was traced so far (calls still unfinished stay pending)."""
        self.settle()
        for _ in self._read():
            pass

    def window(self) -> list[Access]:
        """The accesses traced since the last window, once the server is quiet."""
        self.settle()
        found: list[Access] = []
        for _tid, call, line in self._read():
            found += accesses(line, call, self.cwd)
        for tid, call in self._pending.items():  # still blocked (a FIFO?): the name it asked for counts
            found += accesses(f"{tid} {call} <unfinished ...>", call, self.cwd)
        return found

    def _read(self):
        with open(self.out, "rb") as f:
            f.seek(self._offset)
            data = self._partial + f.read()
        self._offset += len(data) - len(self._partial)
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            m = _LINE.match(raw.decode("ascii", "replace"))
            if m is None:
                continue
            tid, text = m.groups()
            if text.endswith("<unfinished ...>"):
                self._pending[tid] = text[: -len("<unfinished ...>")].rstrip()
                continue
            r = _RESUMED.match(text)
            if r is not None:
                head = self._pending.pop(tid, None)
                if head is None:
                    continue  # began before strace attached
                text = head + r.group(2)
            yield tid, text, f"{tid} {text}"


# --------------------------------------------------------------------------- the index format

MAGIC = b"FASTPOPI"
HEADER = "<8sIIQqQQIII4x"
RECORD = "<QQIHHI4x"


def encode_index(records: list[tuple[bytes, int, int, int, str]], cur_mtime_ns: int, uidvalidity: int = 0) -> bytes:
    """A version-1 fastpop.index (fastpop/store/index.py) of (name, size, file_size, flags, uidl)
    records, checksum right, whatever the names are: fastpop.store.index.encode() refuses nothing
    today, but a writer that validates names must not keep the test from planting them."""
    names = bytearray()
    recs = bytearray()
    total = 0
    for name, size, file_size, flags, uidl in records:
        u = uidl.encode("ascii")
        recs += struct.pack(RECORD, size, file_size, len(names), len(name), len(u), flags)
        names += name + u
        total += size
    names_off = struct.calcsize(HEADER) + len(recs)
    data = bytearray(struct.pack(HEADER, MAGIC, 1, len(records), total, cur_mtime_ns, names_off, len(names),
                                 uidvalidity, 0, 0))
    data += recs + names
    struct.pack_into("<I", data, 56, zlib.crc32(data))
    return bytes(data)


def test_crafted_index_is_what_fastpop_writes():
    """The planted index is only an attack if fastpop would read it as its own:
    same bytes as fastpop.store.index.encode() for ordinary entries."""
    from fastpop.store import index as mindex

    entries = [mindex.Entry("1700000001.M1P1.host:2,", 63, 63, 1, "1700000001.M1P1.host"),
               mindex.Entry("1700000002.M2P1.host:2,S", 70, 66, 0, "1700000002.M2P1.host")]
    ours = encode_index([(os.fsencode(e.name), e.size, e.file_size, e.flags, e.uidl) for e in entries], 123456789, 7)
    assert ours == mindex.encode(entries, 123456789, 7)


# --------------------------------------------------------------------------- generated Maildirs

ENTRY_KINDS = ("msg", "msg", "msg_w", "link_secret_abs", "link_secret_rel", "link_outside_dir", "link_dotdot",
               "link_dangling", "link_victim_msg", "link_victim_dir", "fifo", "fifo_w", "dir", "dir_with_file")
SUB_KINDS = ("dir", "symlink_outside", "symlink_dangling", "symlink_dotdot", "file", "fifo", "missing")
MAILDIR_KINDS = ("dir",) * 10 + ("symlink_box", "file", "missing")
INDEX_KINDS = ("none", "random", "magic_random", "crafted", "crafted", "crafted", "symlink_secret", "fifo")
HOSTILE = ("escape_secret", "escape_secret_dir", "escape_victim", "absolute", "via_link", "dot", "dotdot",
           "empty", "nul", "long", "planted", "planted", "outside_dir_name", "real")
AUX_KINDS = ("none", "none", "symlink_secret", "fifo", "regular")


@dataclasses.dataclass(frozen=True)
class Plan:
    maildir: str = "dir"
    cur: str = "dir"
    new: str = "dir"
    tmp: str = "dir"
    cur_entries: tuple[str, ...] = ()
    new_entries: tuple[str, ...] = ()
    index: str = "none"
    index_names: tuple[tuple[str, int], ...] = ()  # (HOSTILE key, which) records of a crafted index
    index_bytes: bytes = b""
    uidlist: str = "none"
    maildirsize: str = "none"
    index_tmp_link: bool = False


# Most Maildirs are sound, so that a login gets as far as the index and the
# messages; one in four has cur/, new/ or tmp/ replaced by something else.
layouts = st.tuples(st.integers(0, 3), st.sampled_from(("cur", "new", "tmp")), st.sampled_from(SUB_KINDS[1:])).map(
    lambda t: {} if t[0] else {t[1]: t[2]})
plans = layouts.flatmap(lambda layout: st.builds(
    Plan,
    maildir=st.sampled_from(MAILDIR_KINDS),
    cur=st.just(layout.get("cur", "dir")),
    new=st.just(layout.get("new", "dir")),
    tmp=st.just(layout.get("tmp", "dir")),
    cur_entries=st.lists(st.sampled_from(ENTRY_KINDS), max_size=6).map(tuple),
    new_entries=st.one_of(st.just(()), st.lists(st.sampled_from(ENTRY_KINDS), max_size=3).map(tuple)),
    index=st.sampled_from(INDEX_KINDS),
    index_names=st.lists(st.tuples(st.sampled_from(HOSTILE), st.integers(0, 7)), min_size=1, max_size=6).map(tuple),
    index_bytes=st.binary(max_size=300),
    uidlist=st.sampled_from(AUX_KINDS),
    maildirsize=st.sampled_from(AUX_KINDS),
    index_tmp_link=st.booleans(),
))


class Audit:
    """The module's server, tracer, and the fixed parts of the scene."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.srv = ServerProcess(root, "cython")
        self.outside = root / "outside"
        self.victim = self.srv.add_user([], name="victim")  # never logs in; its mail is a target
        self.victim_message = self.victim.maildir / "new" / "1600000009.M9P9.victim"
        self.reset_victim()
        self.control = self.srv.add_user([message("control", "control message\r\n")], name="control")
        self.seq = 0
        self.maildirs: list[str] = []  # the attacked Maildirs so far
        self.tracer: Tracer | None = None
        self.lock_table = os.path.realpath(default_table_path())
        self.read_prefixes = sorted({os.path.realpath(p) for p in (
            "/etc", "/usr", "/lib", "/lib32", "/lib64", "/proc", "/sys", "/dev/null", "/dev/urandom", "/dev/random",
            sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            *site.getsitepackages(), site.getusersitepackages(),
            *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")),
            os.path.dirname(fastpop.__file__),
        )})
        self.read_files = {os.path.realpath(p) for p in (self.srv.passwd, self.srv.log_path)}

    def start(self) -> None:
        """The server, then strace attached to it (or a skip)."""
        old = os.environ.get("PYTHONDONTWRITEBYTECODE")
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # lazy imports must not write .pyc files mid-session
        try:
            self.srv.start()
        finally:
            if old is None:
                del os.environ["PYTHONDONTWRITEBYTECODE"]
            else:
                os.environ["PYTHONDONTWRITEBYTECODE"] = old
        self.tracer = Tracer(self.srv.proc.pid, self.root / "strace.out", str(self.root))

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.stop()

    def reset_victim(self) -> None:
        """Another user's Maildir, as it was (an example on today's code may have emptied it)."""
        shutil.rmtree(self.victim.maildir, ignore_errors=True)
        for sub in ("cur", "new", "tmp"):
            (self.victim.maildir / sub).mkdir(parents=True)
        self.victim_message.write_bytes(message("victim", "VICTIM-SECRET-b7c1e0\r\n"))
        self.victim_message.chmod(0o600)
        self.victim_snapshot = snapshot(self.victim.maildir)

    # -- the verdict on one access
    def allowed(self, a: Access, maildir: str) -> bool:
        path = a.path
        for m in self.maildirs + [maildir]:
            if path == m or path.startswith(m + "/"):
                return True
        if path == self.lock_table or path == os.path.dirname(self.lock_table):
            return True
        if path == self.lock_table + ".shards" or path.startswith(self.lock_table + ".shards/"):
            return True  # the lock table's shard files (fastpop.store.locking)
        if a.write:
            return False
        if path in self.read_files or path == "/dev/null":
            return True
        if a.o_path and maildir.startswith(path.rstrip("/") + "/"):
            return True  # a directory above the Maildir, opened O_PATH to walk down (safefs without openat2)
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.read_prefixes)


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything below ``top``, symlinks not followed: type, content, target, mode."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(top):
        return out
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, top)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", Path(p).read_bytes(), stat.S_IMODE(st_.st_mode))
            else:
                out[rel] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode))
    return out


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    a = Audit(root)
    try:
        a.start()  # may skip: then the server still stops below
        yield a
    finally:
        a.close()
        _release_fifos(root)  # a server stuck opening one could not stop
        rc = a.srv.stop()
        log = a.srv.log()
        assert "Traceback" not in log, log[-5000:]
        assert rc == 0, f"server exit code {rc}\n{log[-5000:]}"


def _release_fifos(top: Path) -> None:
    """Open every FIFO below ``top`` for writing and close it: a reader blocked in
    open(2) (today's code opens FIFOs without O_NONBLOCK) gets EOF instead of
    hanging for the rest of the run."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    for _ in range(4):  # as many blocked readers as show up
                        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                        os.close(fd)
                        time.sleep(0.01)
            except OSError:  # ENXIO: nobody reading
                pass


class Scene:
    """One example's files: the attacked Maildir and the outside world."""

    def __init__(self, audit: Audit, plan: Plan) -> None:
        self.audit = audit
        self.plan = plan
        audit.seq += 1
        self.user = f"audit{audit.seq}"
        self.password = "pw"
        self.maildir = audit.srv.mail / self.user
        self.marker = f"OUTSIDE-SECRET-{audit.seq:04d}-{os.urandom(4).hex()}"
        self.planted: dict[str, int] = {}  # path -> S_IFMT of a non-message entry in cur/ or new/
        self.cur_names: list[str] = []
        self.real_names: list[str] = []
        self.link_dirs: list[str] = []  # names in cur/ of symlinks to an outside directory

    # -- the outside world, fresh for each example
    def build_outside(self) -> None:
        o = self.audit.outside
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(mode=0o700)
        secret = message("outside", f"{self.marker}\r\n")
        (o / "secret").write_bytes(secret)
        (o / "victim_file").write_bytes(f"victim file {self.marker}\n".encode())
        (o / "dir").mkdir()
        self.outside_dir_name = "1600000000.M1P1.outside:2,"
        (o / "dir" / self.outside_dir_name).write_bytes(secret)
        (o / "dir" / "secret").write_bytes(secret)
        for sub in ("cur", "new", "tmp"):
            (o / "box" / sub).mkdir(parents=True)
        (o / "box" / "cur" / "1600000001.M2P1.outside:2,").write_bytes(secret)
        (o / "box" / "new" / "1600000002.M3P1.outside").write_bytes(secret)
        for p in [o, *o.rglob("*")]:
            if p.is_file():
                p.chmod(0o600)

    def build(self) -> None:
        plan, a = self.plan, self.audit
        self.build_outside()
        a.reset_victim()
        with open(a.srv.passwd, "a") as f:
            f.write(f"{self.user}:{{PLAIN}}{self.password}\n")
        m = self.maildir
        o = a.outside
        if plan.maildir == "symlink_box":
            os.symlink(o / "box", m)
        elif plan.maildir == "file":
            m.write_bytes(b"not a directory\n")
        elif plan.maildir == "missing":
            pass
        else:
            m.mkdir()
            for sub in ("cur", "new", "tmp"):
                self._sub(sub, getattr(plan, sub))
            self._entries("cur", plan.cur_entries)
            self._entries("new", plan.new_entries)
            self._aux("dovecot-uidlist", plan.uidlist,
                      f"3 V1700000000 N2 G0\n1 :{self.cur_names[0] if self.cur_names else 'x'}\n".encode())
            self._aux("maildirsize", plan.maildirsize, b"0S\n0 0\n")
            if plan.index_tmp_link:  # where today's code writes the index before renaming it
                os.symlink(o / "victim_file", m / f"fastpop.index.tmp.{a.srv.proc.pid}")
            self._index()
        self.outside_before = snapshot(o)

    def _sub(self, sub: str, kind: str) -> None:
        p = self.maildir / sub
        o = self.audit.outside
        if kind == "dir":
            p.mkdir()
        elif kind == "symlink_outside":
            os.symlink(o / "dir", p)
        elif kind == "symlink_dangling":
            os.symlink(o / "nothing-here", p)
        elif kind == "symlink_dotdot":
            os.symlink("..", p)
        elif kind == "file":
            p.write_bytes(message("a file where a directory belongs"))
        elif kind == "fifo":
            os.mkfifo(p)

    def _entries(self, sub: str, kinds: tuple[str, ...]) -> None:
        d = self.maildir / sub
        if not (d.is_dir() and not d.is_symlink()):
            return
        o = self.audit.outside
        for kind in kinds:
            self.audit.seq += 1
            n = self.audit.seq
            body = message(f"m{n}", f"message {n}\r\n")
            name = f"{1700000000 + n}.M{n}P7.audit"
            if kind in ("msg_w", "fifo_w"):
                name += f",S={len(body)},W={len(body)}"
            if sub == "cur":
                name += ":2,"
            p = d / name
            if kind in ("msg", "msg_w"):
                p.write_bytes(body)
                self.real_names.append(name)
            elif kind == "link_secret_abs":
                os.symlink(o / "secret", p)
            elif kind == "link_secret_rel":
                os.symlink(f"../../../{o.name}/secret", p)
            elif kind == "link_outside_dir":
                os.symlink(o / "dir", p)
                self.link_dirs.append(name)
            elif kind == "link_dotdot":
                os.symlink("..", p)
            elif kind == "link_dangling":
                os.symlink(o / "gone", p)
            elif kind == "link_victim_msg":
                os.symlink(self.audit.victim_message, p)
            elif kind == "link_victim_dir":
                os.symlink(self.audit.victim.maildir / "new", p)
            elif kind in ("fifo", "fifo_w"):
                os.mkfifo(p)
            elif kind == "dir":
                p.mkdir()
            elif kind == "dir_with_file":
                p.mkdir()
                (p / "secret").write_bytes(body)
            if sub == "cur":
                self.cur_names.append(name)
            if kind not in ("msg", "msg_w"):
                self.planted[str(p)] = stat.S_IFMT(os.lstat(p).st_mode)

    def _aux(self, name: str, kind: str, content: bytes) -> None:
        p = self.maildir / name
        if kind == "symlink_secret":
            os.symlink(self.audit.outside / "secret", p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "regular":
            p.write_bytes(content)

    def _hostile(self, key: str, which: int) -> bytes:
        o = self.audit.outside
        victim_msg = self.audit.victim_message.name
        names = {
            "escape_secret": f"../../../{o.name}/secret",
            "escape_secret_dir": f"../../../{o.name}/dir/{self.outside_dir_name}",
            "escape_victim": f"../../victim/new/{victim_msg}",
            "absolute": str(o / "secret"),
            "via_link": f"{self.link_dirs[which % len(self.link_dirs)]}/secret" if self.link_dirs else "sub/secret",
            "dot": ".",
            "dotdot": "..",
            "empty": "",
            "nul": "1700000000.M0P0.nul\x00:2,",
            "long": "x" * 300 + ":2,",
            "planted": self.cur_names[which % len(self.cur_names)] if self.cur_names else "..",
            "outside_dir_name": self.outside_dir_name,
            "real": self.real_names[which % len(self.real_names)] if self.real_names else self.outside_dir_name,
        }
        return os.fsencode(names[key])

    def _index(self) -> None:
        plan, m = self.plan, self.maildir
        p = m / "fastpop.index"
        if plan.index == "none":
            return
        if plan.index == "symlink_secret":
            os.symlink(self.audit.outside / "secret", p)
        elif plan.index == "fifo":
            os.mkfifo(p)
        elif plan.index == "random":
            p.write_bytes(plan.index_bytes)
        elif plan.index == "magic_random":
            p.write_bytes(MAGIC + b"\x01\x00\x00\x00" + plan.index_bytes)
        else:  # crafted: well formed, and cur/'s mtime as it is now, so that it is trusted
            size = len(message("outside", f"{self.marker}\r\n"))
            records = [(self._hostile(key, which), size, size, which & 1, f"u{i}")
                       for i, (key, which) in enumerate(plan.index_names)]
            try:
                mtime = os.stat(m / "cur").st_mtime_ns
            except OSError:
                mtime = 0
            p.write_bytes(encode_index(records, mtime))


class Recording(poplib.POP3):
    """poplib, keeping every byte the server sent."""

    def __init__(self, port: int, sink: bytearray) -> None:
        self.sink = sink
        super().__init__("127.0.0.1", port, timeout=TIMEOUT)

    def _getline(self):
        line, octets = super()._getline()
        self.sink += line + b"\n"
        return line, octets


def session(port: int, user: str, password: str) -> tuple[bytes, list[str], bool]:
    """(all reply bytes, notes, hung): login, STAT, LIST, UIDL, RETR each, DELE all, QUIT."""
    sink = bytearray()
    notes: list[str] = []
    try:
        p = Recording(port, sink)
    except TimeoutError:
        return bytes(sink), ["no greeting"], True
    except OSError as exc:  # refused: the server died (checked later)
        return bytes(sink), [f"cannot connect: {exc!r}"], False
    try:
        def step(what, fn, *args):
            try:
                return fn(*args)
            except poplib.error_proto as exc:  # -ERR, or a line poplib refuses: the session goes on
                notes.append(f"{what}: {exc}")
                return None

        if step("USER", p.user, user) is None or step("PASS", p.pass_, password) is None:
            step("QUIT", p.quit)
            return bytes(sink), notes, False
        step("STAT", p.stat)
        listed = step("LIST", p.list)
        step("UIDL", p.uidl)
        numbers = []
        for line in (listed[1] if listed else [])[:MAX_RETR]:
            head = line.split(b" ", 1)[0]
            if head.isdigit():
                numbers.append(int(head))
        for n in numbers:
            step(f"RETR {n}", p.retr, n)
        for n in numbers:
            step(f"DELE {n}", p.dele, n)
        step("QUIT", p.quit)
        return bytes(sink), notes, False
    except TimeoutError:
        return bytes(sink), notes + ["timed out"], True
    except (ConnectionError, EOFError) as exc:
        return bytes(sink), notes + [f"connection lost: {exc!r}"], False
    finally:
        p.close()


def control_check(audit: Audit) -> str | None:
    """None if the server still logs a user in and serves a message."""
    try:
        p = poplib.POP3("127.0.0.1", audit.srv.port, timeout=5)
        try:
            p.user("control")
            p.pass_("secret")
            p.noop()
            lines = p.retr(1)[1]
            p.quit()
        finally:
            p.close()
    except (OSError, EOFError, poplib.error_proto) as exc:
        return f"control session failed: {exc!r}"
    if b"control message" not in b"\n".join(lines):
        return f"control message garbled: {lines!r}"
    return None


def check(audit: Audit, plan: Plan) -> None:
    scene = Scene(audit, plan)
    scene.build()
    log_at = len(audit.srv.log())
    audit.tracer.skip_to_end()
    replies, notes, hung = session(audit.srv.port, scene.user, scene.password)
    time.sleep(0.05)
    _release_fifos(audit.root / "mail")  # so that today's code, stuck on one, finishes in this window
    seen = audit.tracer.window()
    maildir = os.path.join(os.path.realpath(audit.srv.mail), scene.user)

    bad = [a for a in seen if not audit.allowed(a, maildir)]
    audit.maildirs.append(maildir)
    alive = audit.srv.proc.poll() is None
    control = control_check(audit) if alive else "server exited"
    log = audit.srv.log()[log_at:]
    context = (f"\nplan: {plan}\nsession notes: {notes}\nreplies:\n{replies.decode(errors='replace')[:3000]}"
               f"\nserver log:\n{log[-4000:]}")

    assert not bad, (f"{len(bad)} access(es) outside {maildir}:\n  "
                     + "\n  ".join(str(a) for a in bad[:12]) + context)
    logged_in = b"\n+OK" in replies and not any(n.startswith(("USER", "PASS")) for n in notes)
    if logged_in:  # the tracer is not blind: a login opens at least the Maildir
        assert any(a.path == maildir or a.path.startswith(maildir + "/") for a in seen), (
            f"strace saw nothing of {scene.user}'s session: {len(seen)} accesses traced" + context)
    assert scene.marker.encode() not in replies, "an outside file was served" + context
    assert b"VICTIM-SECRET" not in replies, "another user's message was served" + context
    assert snapshot(audit.outside) == scene.outside_before, "files outside the Maildir changed" + context
    assert snapshot(audit.victim.maildir) == audit.victim_snapshot, "another user's Maildir changed" + context
    assert not hung, f"the session hung (a reply took over {TIMEOUT:.0f} s)" + context
    moved = [p for p, kind in scene.planted.items()
             if not os.path.lexists(p) or stat.S_IFMT(os.lstat(p).st_mode) != kind]
    assert not moved, f"planted non-message entries moved or removed: {moved}" + context
    assert alive and control is None, f"server unhealthy after the session: {control}" + context
    assert "Traceback" not in log, "the server logged a Traceback" + context


# --------------------------------------------------------------------------- the test

@needs_strace
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans)
# each attack of issue 16 that a POP3 session can trigger, first
@example(plan=Plan(cur_entries=("msg", "link_secret_abs", "link_secret_rel")))  # a symlink in cur/
@example(plan=Plan(cur_entries=("msg",), index="crafted",  # a crafted index, trusted
                   index_names=(("escape_secret", 0), ("real", 0), ("escape_victim", 0), ("absolute", 0))))
@example(plan=Plan(new="symlink_outside", cur_entries=("msg",)))  # new/ a symlink to a directory
@example(plan=Plan(cur="symlink_outside", index="crafted", index_names=(("outside_dir_name", 0),)))
@example(plan=Plan(maildir="symlink_box"))  # the Maildir a symlink
@example(plan=Plan(cur="symlink_dotdot"))  # cur/ -> .., the directory of every user's Maildir
@example(plan=Plan(cur_entries=("msg",), index="symlink_secret", uidlist="symlink_secret",
                   maildirsize="symlink_secret"))  # auxiliary files that are symlinks
@example(plan=Plan(cur_entries=("msg", "link_outside_dir", "link_victim_msg"), index="crafted",
                   index_names=(("via_link", 0), ("planted", 2), ("nul", 0), ("dotdot", 0))))
@example(plan=Plan(cur_entries=("fifo", "fifo_w", "msg"), new_entries=("fifo",), uidlist="fifo",
                   index_tmp_link=True))  # FIFOs where files are read
def test_hostile_maildir_touches_nothing_outside(audit, plan):
    check(audit, plan)
