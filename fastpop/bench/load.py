"""Load models and the client processes that carry them out.

Closed loop (``connections``): each connection runs one session after
another, as fast as the server answers.  Open loop (``rate``): sessions
start on a fixed schedule whatever the server does; a session's latency is
measured from its scheduled start, so when the server (or a full user pool)
holds sessions back the wait shows in the numbers instead of lowering the
offered load (no coordinated omission).  ``idle`` opens ``connections``
logged-in sessions and holds them.

The run is split over ``procs`` forked processes, each with its own event
loop (uvloop by default), its own share of the connections or rate, and a
disjoint share of the users, so no two concurrent sessions use one mailbox.
They start together at an agreed CLOCK_MONOTONIC instant, report once a
second (counts and that second's session latencies) and finally send their
HdrHistograms, which the parent merges.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import socket
import ssl
import time
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, cast

from fastpop.bench import capacity
from fastpop.bench import client as C
from fastpop.bench import scenarios as S

if TYPE_CHECKING:
    from fastpop.bench.spawn import MessageFactory, SizeDistribution

_now = time.monotonic_ns
NS = 1_000_000_000
HIST_MAX_US = 3_600_000_000  # an hour, in microseconds
MAX_ERROR_SAMPLES = 5


def new_histogram():
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, HIST_MAX_US, 3)


def _record_counts_slow(h, values) -> None:
    for v, n in Counter(values).items():
        h.record_value(v if v > 0 else 1, n)


def _record_counts_fast(h, values) -> None:
    """``h.record_value(v if v > 0 else 1, n)`` for every distinct value ``v`` seen
    ``n`` times, with hdrh's index arithmetic (``_counts_index_for``) inlined:
    its ``record_value`` costs some 2 us a call in Python, and a second's
    latencies of one label hold hundreds of distinct values."""
    counts = h.counts
    mask = h.sub_bucket_mask
    shift = h.unit_magnitude + h.sub_bucket_half_count_magnitude + 1
    half_mag = h.sub_bucket_half_count_magnitude
    base = h.sub_bucket_half_count
    unit = h.unit_magnitude
    size = h.counts_len
    total = 0
    lo, hi = h.min_value, h.max_value
    for v, n in Counter(values).items():
        if v <= 0:
            v = 1
        bucket = (v | mask).bit_length() - shift
        i = ((bucket + 1) << half_mag) + (v >> (bucket + unit)) - base
        if 0 <= i < size:
            counts[i] += n
            total += n
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    h.total_count += total
    h.min_value, h.max_value = lo, hi


def _pick_record_counts():
    """The inlined recorder if it gives exactly what hdrh's own record_value does
    (checked here, once, against this installed hdrh), else hdrh's."""
    try:
        values = array("q", [0, 1, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 5000, 99_999, 1_000_001,
                             HIST_MAX_US, HIST_MAX_US * 4, -3, 5000, 1, 2048])
        a, b = new_histogram(), new_histogram()
        _record_counts_slow(a, values)
        _record_counts_fast(b, values)
        same = (a.encode() == b.encode() and a.get_total_count() == b.get_total_count()
                and a.get_min_value() == b.get_min_value() and a.get_max_value() == b.get_max_value())
        return _record_counts_fast if same else _record_counts_slow
    except Exception:  # another hdrh: its attributes are not ours to know
        return _record_counts_slow


_record_counts = None


def record_counts(h, values) -> None:
    """Record every value of ``values`` (us; <= 0 recorded as 1) into HdrHistogram ``h``."""
    global _record_counts
    if _record_counts is None:
        _record_counts = _pick_record_counts()
    _record_counts(h, values)


@dataclass
class LoadSpec:
    """One run, as the parent sees it; ``split`` gives each process its share."""

    host: str
    port: int
    scenario: str = "stat"
    mix: dict[str, float] = field(default_factory=dict)
    users: list[tuple[str, str]] = field(default_factory=list)
    large_users: list[tuple[str, str]] = field(default_factory=list)
    tls: str = "none"  # none, starttls, implicit
    cafile: str | None = None
    server_hostname: str | None = None
    auth: str = "user"  # user (USER/PASS) or plain (AUTH PLAIN)
    connections: int = 16
    rate: float | None = None  # sessions/s: open loop
    duration: float | None = 5.0
    sessions: int | None = None
    warmup: float = 0.0
    procs: int = 1
    timeout: float = 10.0
    loop: str = "uvloop"
    reseed: str | None = None  # Maildir template (%u) for download-delete
    reseed_size: SizeDistribution | None = None
    seed: int = 1
    idle_noop: float = 0.0
    idle_ramp: int = 64  # logins in flight at once while opening idle sessions
    sources: list[str] = field(default_factory=list)  # source addresses, one per connection in turn (capacity)
    # per process (set by split)
    index: int = 0
    phase: float = 0.0
    t0: int = 0

    @property
    def scenarios_used(self) -> list[str]:
        return list(self.mix) if self.scenario == "mixed" else [self.scenario]

    def split(self) -> list[LoadSpec]:
        procs = self.procs
        out = []
        for i in range(procs):
            share_conn = self.connections // procs + (1 if i < self.connections % procs else 0)
            sessions = None
            if self.sessions is not None:
                sessions = self.sessions // procs + (1 if i < self.sessions % procs else 0)
            large = self.large_users[i::procs] if len(self.large_users) >= procs else list(self.large_users)
            sources = self.sources
            if len(sources) >= procs:
                sources = sources[i::procs]
            elif sources:  # all of them, each process starting at another
                sources = sources[i % len(sources):] + sources[:i % len(sources)]
            out.append(replace(
                self,
                index=i,
                users=self.users[i::procs],
                large_users=large,
                sources=sources,
                connections=share_conn,
                sessions=sessions,
                rate=None if self.rate is None else self.rate / procs,
                phase=0.0 if self.rate is None else i / self.rate,
            ))
        return out


class UserPool:
    """Mailboxes free for a session; sessions wait in FIFO order when none is."""

    def __init__(self, users: list[S.User], loop: asyncio.AbstractEventLoop) -> None:
        self.free = deque(users)
        self.waiters: deque[asyncio.Future] = deque()
        self.loop = loop
        self.size = len(users)

    async def get(self) -> S.User:
        if self.free:
            return self.free.popleft()
        fut = self.loop.create_future()
        self.waiters.append(fut)
        return await fut

    def put(self, user: S.User) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(user)
                return
        self.free.append(user)

    def cancel_waiters(self) -> None:
        while self.waiters:
            self.waiters.popleft().cancel()


class Worker:
    """One client process: runs its share of the load on its own event loop."""

    def __init__(self, spec: LoadSpec, conn: Connection | None, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.conn = conn
        self.loop = loop
        self.timeout = spec.timeout
        self.timeout_ns = int(spec.timeout * NS)
        self.server_hostname = spec.server_hostname or spec.host
        self.ssl_context = make_ssl_context(spec.cafile) if spec.tls != "none" else None
        self.opts = S.Options(starttls=spec.tls == "starttls")
        self.t0 = spec.t0
        self.ws = self.t0 + int(spec.warmup * NS)
        self.we = self.ws + int(spec.duration * NS) if spec.duration is not None else 1 << 62
        self.lat = [array("q") for _ in C.LABELS]
        self.hists = [new_histogram() for _ in C.LABELS]
        self.sec_lat = array("q")
        # all-time counters (the timeline) and in-window counters (the totals)
        self.all: Counter[str] = Counter()
        self.win: Counter[str] = Counter()
        # commands answered: plain ints, bumped by Session._reply on every reply (folded into
        # all/win by _sync_commands)
        self.commands = 0
        self.win_commands = 0
        self.errors: Counter = Counter()
        self.error_samples: dict[str, list[str]] = {}
        self.unverified = 0
        self.active: set[C.Session] = set()
        self.held: set[C.Session] = set()
        self.ramping: set[C.Session] = set()
        self._ramp_sem: asyncio.Semaphore | None = None
        self.first_start = 0
        self.last_end = 0
        self.quota = spec.sessions
        self.backlog = 0
        self.drained = 0
        self.stopping = False
        self.cpu_marks: dict[str, float] = {}
        self._last_sent: Counter = Counter()
        self._tick_no = 0
        auth = spec.auth
        self.pools: dict[str, UserPool] = {"normal": UserPool([S.User(n, p, auth) for n, p in spec.users], loop)}
        if spec.large_users:
            self.pools["large"] = UserPool([S.User(n, p, auth) for n, p in spec.large_users], loop)
        self.rng = random.Random(spec.seed * 1000 + spec.index)
        mix = spec.mix or S.DEFAULT_MIX
        self._mix_names = list(mix)
        self._mix_weights = list(mix.values())
        self._reseed_factory: MessageFactory | None = None
        self._reseed_cache: list[bytes] = []
        self._owners: dict[str, tuple[int, int] | None] = {}
        self._next_source = 0
        self._target: tuple[int, tuple] | None = None  # (family, sockaddr), resolved once for --source

    # ------------------------------------------------------------ recording (hot)

    def record(self, label: int, ns: int, now: int) -> None:
        if now >= self.ws:
            self.lat[label].append(ns // 1000)

    def _sync_commands(self) -> None:
        self.all["commands"] = self.commands
        if self.win_commands:
            self.win["commands"] = self.win_commands

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        samples = self.error_samples.setdefault(kind, [])
        if len(samples) < MAX_ERROR_SAMPLES and detail not in samples:
            samples.append(detail)

    def session_finished(self, s: C.Session, ok: bool) -> None:
        now = _now()
        self.active.discard(s)
        self.held.discard(s)
        if s in self.ramping:
            self.ramping.discard(s)
            assert self._ramp_sem is not None
            self._ramp_sem.release()
        self.last_end = now
        if not ok:
            self.all["failed"] += 1
            if self.ws <= now <= self.we:
                self.win["failed"] += 1
            return
        latency = now - s.intended
        self.record(C.L_SESSION, latency, now)
        self.sec_lat.append(latency // 1000)
        a = self.all
        a["sessions"] += 1
        a["messages"] += s.messages
        a["octets"] += s.octets
        if self.ws <= now <= self.we:
            w = self.win
            w["sessions"] += 1
            w["messages"] += s.messages
            w["octets"] += s.octets
        elif now > self.we:
            self.drained += 1

    def hold(self, s: C.Session) -> None:
        self.held.add(s)
        if s in self.ramping:
            self.ramping.discard(s)
            assert self._ramp_sem is not None
            self._ramp_sem.release()
        if self.opts.releasing:  # its NOOP was in flight when the hold ended: it ends now too
            self.loop.call_soon(s.resume)
        elif self.spec.idle_noop > 0:
            self.loop.call_later(self.spec.idle_noop, s.resume)

    # ------------------------------------------------------------ sessions

    def pick(self) -> tuple[str, UserPool]:
        name = self.spec.scenario
        if name == "mixed":
            name = self.rng.choices(self._mix_names, self._mix_weights)[0]
        pool = self.pools["large"] if name == "retr-large" and "large" in self.pools else self.pools["normal"]
        return name, pool

    async def session(self, name: str, user: S.User, intended: int) -> None:
        s = C.Session(self, S.FUNCTIONS[name](user, self.opts), user, intended)
        if s.start >= self.ws and s.start <= self.we:
            self.win["started"] += 1
        self.all["started"] += 1
        if not self.first_start:
            self.first_start = s.start
        self.active.add(s)
        if name == "idle":
            self.ramping.add(s)
        spec = self.spec
        # no asyncio.timeout() here (per session a Timeout, a timer armed and cancelled, and
        # get_running_loop() calls that each make a getpid() syscall): _sweep cancels a connect
        # (with implicit TLS: connect and handshake) that takes longer than the timeout instead
        s.task = task = asyncio.current_task(self.loop)
        try:
            if spec.sources:
                await self._connect_from_source(s)
            elif spec.tls == "implicit":
                await self.loop.create_connection(lambda: s, spec.host, spec.port, ssl=self.ssl_context,
                                                  server_hostname=self.server_hostname)
            else:
                await self.loop.create_connection(lambda: s, spec.host, spec.port)
            s.task = None  # connected: the sweep must not cancel this task any more
        except asyncio.CancelledError:
            if not s.connect_expired:
                raise
            if task is not None and hasattr(task, "uncancel"):  # 3.11+
                task.uncancel()
            s._fail("connect", f"no connection within {self.timeout:g} s")
        except ssl.SSLError as exc:
            s._fail("tls", f"TLS handshake: {exc}")
        except OSError as exc:
            why = capacity.explain(exc.errno) if exc.errno else ""
            s._fail("connect", f"connect to {spec.host}:{spec.port}: {exc.strerror or exc}"
                    + (f" ({why})" if why else ""))
        await s.done
        if s.result and spec.reseed:
            self.reseed(user, s.result)

    async def _connect_from_source(self, s: C.Session) -> None:
        """Connect from the next of ``sources`` (its port chosen per destination)."""
        spec = self.spec
        if self._target is None:
            info = (await self.loop.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM))[0]
            self._target = (int(info[0]), info[4])
        family, addr = self._target
        source = spec.sources[self._next_source % len(spec.sources)]
        self._next_source += 1
        sock = capacity.bound_socket(family, source)
        try:
            await self.loop.sock_connect(sock, addr)
            if spec.tls == "implicit":
                await self.loop.create_connection(lambda: s, sock=sock, ssl=self.ssl_context,
                                                  server_hostname=self.server_hostname)
            else:
                await self.loop.create_connection(lambda: s, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def _closed(self) -> None:
        while not self.stopping:
            now = _now()
            if now >= self.we:
                break
            if self.quota is not None and now >= self.ws:
                if self.quota <= 0:
                    break
                self.quota -= 1
            name, pool = self.pick()
            user = await pool.get()
            await self.session(name, user, _now())
            pool.put(user)

    async def _open_one(self, intended: int) -> None:
        name, pool = self.pick()
        try:
            user = await pool.get()
        except asyncio.CancelledError:
            self.backlog += 1  # the schedule ended before a mailbox was free
            return
        try:
            await self.session(name, user, intended)
        finally:
            pool.put(user)

    async def _open(self) -> None:
        assert self.spec.rate
        interval = NS / self.spec.rate
        nxt = float(self.t0 + int(self.spec.phase * NS))
        tasks: set[asyncio.Task] = set()
        end = self.we
        quota = self.quota
        while not self.stopping:
            now = _now()
            while nxt <= now and nxt < end:
                if quota is not None and nxt >= self.ws:
                    if quota <= 0:
                        end = 0
                        break
                    quota -= 1
                t = self.loop.create_task(self._open_one(int(nxt)))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                nxt += interval
            if nxt >= end:
                break
            await asyncio.sleep(max(0.0, (nxt - _now()) / NS))
        # sessions still waiting for a mailbox when the schedule ends never start
        for pool in self.pools.values():
            pool.cancel_waiters()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _idle(self) -> None:
        self._ramp_sem = asyncio.Semaphore(max(1, self.spec.idle_ramp))
        tasks = []
        pool = self.pools["normal"]
        for _ in range(self.spec.connections):
            await self._ramp_sem.acquire()
            if self.stopping:
                break
            user = await pool.get()
            tasks.append(self.loop.create_task(self.session("idle", user, _now())))
        # wait for the last logins (each one is held or has failed), then hold
        while len(self.held) + self.all["failed"] < len(tasks) and not self.stopping:
            await asyncio.sleep(0.01)
        self.all["opened"] = len(self.held)
        self.all["ramp_ns"] = _now() - self.t0
        if self.spec.duration:
            await asyncio.sleep(self.spec.duration)
        self.opts.releasing = True
        for s in list(self.held):
            s.resume()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------ re-seeding

    def reseed(self, user: S.User, count: int) -> None:
        """Put ``count`` fresh messages into the user's Maildir (download-delete)."""
        from fastpop.bench.spawn import MessageFactory, SizeDistribution, deliver

        spec = self.spec
        assert spec.reseed is not None, "called only when the run re-seeds"
        if self._reseed_factory is None:
            factory = self._reseed_factory = MessageFactory(spec.seed * 7919 + spec.index)
            size = spec.reseed_size or SizeDistribution("fixed", 3700)
            rng = random.Random(spec.seed + spec.index)
            self._reseed_cache = [factory.message("reseed", i, size.sample(rng)) for i in range(64)]
        maildir = spec.reseed.replace("%u", user.name)
        owner = self._owners.get(maildir, False)
        if owner is False:
            try:
                st = os.stat(maildir)
                owner = (st.st_uid, st.st_gid) if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()) else None
            except OSError as exc:
                self.error("reseed", f"{maildir}: {exc.strerror}")
                return
            self._owners[maildir] = owner
        cache = self._reseed_cache
        try:
            for _ in range(count):
                deliver(maildir, cache[self.rng.getrandbits(6)], "new", owner)  # type: ignore[arg-type]
        except OSError as exc:
            self.error("reseed", f"{maildir}: {exc.strerror}")

    # ------------------------------------------------------------ housekeeping

    def _sweep(self) -> None:
        now = _now()
        limit = self.timeout_ns
        for s in list(self.active):
            if s.finished or s.held:
                continue
            if s.transport is not None:
                if now - s.sent > limit:
                    s.timed_out()
            elif now - s.start > limit and not s.connect_expired and s.task is not None:
                s.connect_expired = True  # session() reports it when the cancelled connect returns
                s.task.cancel()
        self.loop.call_later(0.25, self._sweep)

    def _fold(self) -> None:
        for i, values in enumerate(self.lat):
            if values:
                record_counts(self.hists[i], values)
                del values[:]

    def _tick(self) -> None:
        self._tick_no += 1
        self._fold()
        self._sync_commands()
        gc.collect(1)
        hist = new_histogram()
        record_counts(hist, self.sec_lat)
        del self.sec_lat[:]
        delta = {k: self.all[k] - self._last_sent[k] for k in ("sessions", "commands", "messages", "octets", "failed",
                                                               "started")}
        self._last_sent = Counter(self.all)
        errors = sum(self.errors.values())
        self._send({
            "type": "tick", "worker": self.spec.index, "second": self._tick_no, **delta,
            "errors": errors, "active": len(self.active), "held": len(self.held),
            "hist": hist.encode() if hist.get_total_count() else None,
        })
        self.loop.call_at(self._loop_time_at(self.t0 + (self._tick_no + 1) * NS), self._tick)

    def _mark_cpu(self, name: str) -> None:
        t = os.times()
        self.cpu_marks[name] = t.user + t.system

    def _loop_time_at(self, mono_ns: int) -> float:
        return self.loop.time() + (mono_ns - _now()) / NS

    def _send(self, message: dict) -> None:
        if self.conn is not None:
            self.conn.send(message)

    # ------------------------------------------------------------ the run

    async def run(self) -> dict:
        loop = self.loop
        await asyncio.sleep(max(0.0, (self.t0 - _now()) / NS))
        self._mark_cpu("start")
        loop.call_at(self._loop_time_at(self.ws), self._mark_cpu, "window_start")
        if self.spec.duration is not None and self.spec.scenario != "idle":
            loop.call_at(self._loop_time_at(self.we), self._mark_cpu, "window_end")
        loop.call_at(self._loop_time_at(self.t0 + NS), self._tick)
        loop.call_later(0.25, self._sweep)
        if self.spec.scenario == "idle":
            await self._idle()
        elif self.spec.rate:
            await self._open()
        else:
            await asyncio.gather(*(self._closed() for _ in range(self.spec.connections)))
        end = _now()
        if self.spec.duration is None or self.spec.scenario == "idle":
            self.we = end
            self._mark_cpu("window_end")
        # drain: sessions in flight finish (or time out)
        deadline = end + self.timeout_ns + NS
        while self.active and _now() < deadline:
            await asyncio.sleep(0.01)
        for s in list(self.active):
            s.timed_out()
        self._mark_cpu("end")
        self._fold()
        self._sync_commands()
        return self.final()

    def final(self) -> dict:
        return {
            "type": "final",
            "worker": self.spec.index,
            "hists": {C.LABELS[i]: h.encode() for i, h in enumerate(self.hists) if h.get_total_count()},
            "window": dict(self.win),
            "all": dict(self.all),
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "unverified": self.unverified,
            "backlog": self.backlog,
            "drained": self.drained,
            "first_start": self.first_start,
            "last_end": self.last_end,
            "window_start": self.ws,
            "window_end": self.we,
            "cpu": self.cpu_marks,
            "loop": type(self.loop).__module__.split(".")[0],
        }


def make_ssl_context(cafile: str | None) -> ssl.SSLContext:
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def worker_main(spec: LoadSpec, conn: Connection) -> None:
    """Entry point of a client process."""
    try:
        import gc

        gc.freeze()  # the parent's objects are not ours to scan
        gc.disable()  # sessions make no reference cycles; the tick collects once a second
        loop = new_loop(spec.loop)
        asyncio.set_event_loop(loop)
        conn.send({"type": "ready", "worker": spec.index})
        message = conn.recv()
        spec = replace(spec, t0=message["t0"])
        worker = Worker(spec, conn, loop)
        result = loop.run_until_complete(worker.run())
        conn.send(result)
    except BaseException:  # report anything to the parent, which reports it to the user
        try:
            conn.send({"type": "crash", "worker": spec.index, "traceback": traceback.format_exc()})
        except Exception:
            pass
    finally:
        conn.close()


# ------------------------------------------------------------------ the parent


@dataclass
class RunOutput:
    """What the workers said, merged (report.py turns it into the result)."""

    spec: LoadSpec
    finals: list[dict]
    timeline: list[dict]
    server: dict
    wall: float
    crashes: list[str]
    machine: dict = field(default_factory=dict)


def _wait(conns: list[Connection], timeout: float) -> list[Connection]:
    """``multiprocessing.connection.wait``: those of ``conns`` that are ready (typed as such)."""
    return cast("list[Connection]", wait(conns, timeout=timeout))


def run(spec: LoadSpec, monitor=None, on_tick: Callable[[dict], None] | None = None,
        start_delay: float = 0.2) -> RunOutput:
    """Fork the client processes, run the load, collect and merge their reports."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    shares = spec.split()
    procs, conns = [], []
    for share in shares:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=worker_main, args=(share, child_end), daemon=True, name=f"bench-{share.index}")
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    crashes: list[str] = []
    finals: list[dict] = []
    seconds: dict[int, dict] = {}
    server: dict = {}
    started = time.monotonic()
    machine = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
               "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        # everyone ready, then one start instant for all
        ready = 0
        while ready < len(conns):
            for c in _wait(conns, 30):
                msg = c.recv()
                if msg["type"] == "ready":
                    ready += 1
                elif msg["type"] == "crash":
                    raise RuntimeError("client process failed:\n" + msg["traceback"])
            if time.monotonic() - started > 60:
                raise RuntimeError("client processes did not start")
        if monitor is not None:
            server["rss_before"], server["pss_before"] = monitor.memory()
        t0 = _now() + int(start_delay * NS)
        for c in conns:
            c.send({"t0": t0})
        ws = t0 + int(spec.warmup * NS)
        we = ws + int(spec.duration * NS) if spec.duration is not None else None
        marks = {"window_start": ws}
        if we is not None and spec.scenario != "idle":
            marks["window_end"] = we
        open_conns = list(conns)
        idle_best = (-1, 0, 0)
        while open_conns:
            now = _now()
            if monitor is not None:
                for name, at in list(marks.items()):
                    if now >= at:
                        monitor.mark(name)
                        del marks[name]
                monitor.sample_rss()
            for c in _wait(open_conns, 0.1):
                try:
                    msg = c.recv()
                except EOFError:
                    open_conns.remove(c)
                    continue
                kind = msg["type"]
                if kind == "tick":
                    sec = seconds.setdefault(msg["second"], {"second": msg["second"], "reports": []})
                    sec["reports"].append(msg)
                    if len(sec["reports"]) == len(conns):
                        merged = _merge_tick(sec)
                        if monitor is not None and spec.scenario == "idle":
                            rss, pss = monitor.memory()
                            merged["server_rss"], merged["server_pss"] = rss, pss
                            if merged["held"] >= idle_best[0]:
                                idle_best = (merged["held"], rss, pss)
                        if on_tick is not None:
                            on_tick(merged)
                elif kind == "final":
                    finals.append(msg)
                    open_conns.remove(c)
                elif kind == "crash":
                    crashes.append(msg["traceback"])
                    open_conns.remove(c)
        if monitor is not None:
            for name in ("window_start", "window_end"):
                if name not in monitor.marks:
                    monitor.mark(name)
            server["cpu_seconds"] = monitor.marks["window_end"] - monitor.marks["window_start"]
            server["peak_rss"] = monitor.peak_rss
            server["processes"] = monitor.processes
            if spec.scenario == "idle" and idle_best[0] > 0:
                server["idle_sessions"] = idle_best[0]
                server["rss_held"], server["pss_held"] = idle_best[1], idle_best[2]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
    timeline = [_merge_tick(seconds[k]) for k in sorted(seconds)]
    machine["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return RunOutput(spec, finals, timeline, server, time.monotonic() - started, crashes, machine)


def _merge_tick(sec: dict) -> dict:
    if "merged" in sec:
        return sec["merged"]
    from hdrh.histogram import HdrHistogram

    merged: dict = {"second": sec["second"]}
    for key in ("sessions", "commands", "messages", "octets", "failed", "started", "errors", "active", "held"):
        merged[key] = sum(r.get(key, 0) for r in sec["reports"])
    hist = None
    for r in sec["reports"]:
        if r.get("hist"):
            if hist is None:
                hist = HdrHistogram.decode(r["hist"])
            else:
                hist.decode_and_add(r["hist"])
    if hist is not None and hist.get_total_count():
        merged.update({
            "p50_us": hist.get_value_at_percentile(50),
            "p90_us": hist.get_value_at_percentile(90),
            "p99_us": hist.get_value_at_percentile(99),
            "max_us": hist.get_max_value(),
        })
    sec["merged"] = merged
    return merged
