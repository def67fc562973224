"""Log line formats: ``text`` (the default), ``keyvalue`` (logfmt) and ``json``.

fastpop's log calls already write Dovecot-like ``key=value`` pairs in their
format strings (``"session user=%s rip=%s top=%d/%d ..."``).  The structured
formats read those pairs from the format string and its arguments, so no log
call changes and ``text`` costs what it always did:

- the words before the first pair are the ``event`` (``session``, ``auth
  failed``, ``login``, ``disconnected``);
- ``key=%s`` / ``key=%d`` becomes a field ``key`` (``%d`` as a number);
- ``key=%d/%d`` (count/bytes) becomes ``key`` and ``key_bytes``;
- a message with more than event and pairs keeps its whole text in ``msg``.

Every line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``
(lower case), ``logger``, ``pid``, then ``event`` (or ``msg``) and the
fields; ``exc`` carries a traceback.  A field named like one of these gets a
trailing ``_``.  JSON lines are one object each; keyvalue lines quote values
that contain spaces, quotes, ``=`` or nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastpop.config import Config

FORMATS = ("text", "keyvalue", "json")


def validate(config: Config) -> None:
    """The log format's check for fastpop.serve.validation (raises ValueError)."""
    if config.log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {config.log_format!r}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_RESERVED = frozenset({"ts", "level", "logger", "pid", "event", "msg", "exc"})
_PAIR = re.compile(r"(?<![\w%])([A-Za-z_]\w*)=(%[sdr])(?:/(%[sdr]))?(?=[\s,;:)]|$)")
_SPEC = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrifgxXeEoc%]")


class _Template:
    """What a format string says: its event, its pairs and which arguments fill them."""

    __slots__ = ("event", "pairs", "complete", "nargs")

    def __init__(self, msg: str) -> None:
        self.pairs: list[tuple[int, str, str]] = []  # (argument index, field name, spec)
        specs = [m for m in _SPEC.finditer(msg) if m.group() != "%%"]
        self.nargs = len(specs)
        arg_at = {m.start(): i for i, m in enumerate(specs)}
        first = None
        rest = []
        last = 0
        for m in _PAIR.finditer(msg):
            if first is None:
                first = m.start()
            rest.append(msg[last:m.start()])
            last = m.end()
            key = m.group(1)
            if key in _RESERVED:
                key += "_"
            self.pairs.append((arg_at[m.start(2)], key, m.group(2)))
            if m.group(3):
                self.pairs.append((arg_at[m.start(3)], key + "_bytes", m.group(3)))
        rest.append(msg[last:])
        self.event = (msg if first is None else msg[:first]).strip().replace("%%", "%")
        # complete: nothing but the event and pairs (blanks between them)
        self.complete = first is not None and "%" not in self.event and all(not r.strip() for r in rest[1:])


_templates: dict[str, _Template | None] = {}


def _template(msg: str) -> _Template | None:
    try:
        return _templates[msg]
    except KeyError:
        pass
    try:
        template = _Template(msg)
    except (KeyError, ValueError):
        template = None
    if len(_templates) < 4096:
        _templates[msg] = template
    return template


def record_fields(record: logging.LogRecord) -> dict:
    """The structured view of a record: ts, level, logger, pid, event or msg, fields, exc."""
    out: dict = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": record.process if record.process is not None else _pid(),
    }
    msg, args = record.msg, record.args
    template = _template(msg) if isinstance(msg, str) and isinstance(args, tuple) else None
    if template is not None and isinstance(args, tuple) and template.pairs and template.nargs == len(args):
        if template.complete:
            out["event"] = template.event
        else:
            out["event"] = template.event
            out["msg"] = record.getMessage()
        for index, key, spec in template.pairs:
            value: Any = args[index]  # whatever the caller logged
            if spec == "%d":
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    value = str(value)
            elif spec == "%r":
                value = repr(value)
            elif not isinstance(value, (int, float, bool)) or value is None:
                value = str(value)
            out[key] = value
    else:
        out["msg"] = record.getMessage()
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        out["exc"] = record.exc_text
    if record.stack_info:
        out["stack"] = record.stack_info
    return out


_pid_cache: list[int] = []


def _pid() -> int:
    """This process's id, asked once per process (getpid is a system call;
    logging would ask it for every record)."""
    if not _pid_cache:
        _pid_cache.append(os.getpid())
    return _pid_cache[0]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pid_cache.clear)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), ensure_ascii=False, default=str)


_BARE = re.compile(r"[^\s\"=\\]+")


def _logfmt_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in record_fields(record).items())


class TextFormatter(logging.Formatter):
    """logging's text format, with the local time formatted once per second."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        msec_format = self.default_msec_format
        assert msec_format is not None, "logging's own, which this formatter keeps"
        return msec_format % (self._stamp, record.msecs)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JSONFormatter()
    if kind == "keyvalue":
        return KeyValueFormatter()
    if kind == "text":
        return TextFormatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {kind!r}")


class TurnBufferedStream:
    """A log stream that can put off writing to the end of an event-loop turn
    (``flush``) or write at once (``flush_now``); see SessionBatchingHandler."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._lock = threading.Lock()  # executor threads log too
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, and its thread, last seen
        self._loop_thread = 0
        _buffered_streams.add(self)

    def write(self, text: str) -> int:
        with self._lock:
            self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """At the end of this turn of the running loop; at once without one
        (another thread, or before or after the loop)."""
        if self._scheduled:
            return
        loop = self._loop
        if loop is None or threading.get_ident() != self._loop_thread or not loop.is_running():
            try:  # (asked only when the thread or the loop changed: on Python 3.11 it costs a getpid(2))
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush_now()
                return
            self._loop, self._loop_thread = loop, threading.get_ident()
        self._scheduled = True
        loop.call_soon(self.flush_now)

    def forget_loop(self) -> None:
        self._loop, self._scheduled = None, False

    def flush_now(self) -> None:
        with self._lock:
            self._scheduled = False
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken standard error: dropped, as logging would
                pass

    def fileno(self) -> int:
        return int(self._stream.fileno())


_buffered_streams: weakref.WeakSet[TurnBufferedStream] = weakref.WeakSet()


def _flush_before_fork() -> None:
    for stream in list(_buffered_streams):
        stream.flush_now()  # else the child would write the parent's pending lines again


def _forget_loops_in_child() -> None:
    for stream in list(_buffered_streams):
        stream.forget_loop()  # the parent's loop does not run in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_flush_before_fork, after_in_child=_forget_loops_in_child)

SESSION_LOGGER = "fastpop.session"


class SessionBatchingHandler(logging.StreamHandler):
    """Writes the per-session lines of one event-loop turn in one write(2).

    A server logs a line per session (``session user=...``, ``auth
    failed ...``); written one by one that is a system call per session,
    most of what logging it costs.  Those lines (logger ``fastpop.session``
    at INFO) are flushed at the end of the loop's turn, so under load a
    batch goes out in one write and when idle each line is out before the
    loop waits again (a reply may reach its client a moment before the
    line that logs it); every other line (startup, warnings, errors, debug
    lines when diagnosing) is written at once, after whatever is pending,
    so lines keep their order.
    A process killed outright loses at most one turn's session lines; every
    exit path of fastpop runs logging.shutdown(), and a fork writes what is
    pending first."""

    def __init__(self, stream: Any) -> None:
        super().__init__(TurnBufferedStream(stream))
        self._defer = False

    def emit(self, record: logging.LogRecord) -> None:
        self._defer = record.levelno == logging.INFO and record.name == SESSION_LOGGER
        try:
            super().emit(record)  # (which calls flush)
        finally:
            self._defer = False

    def flush(self) -> None:
        self.acquire()
        try:
            stream = self.stream
            if self._defer:
                stream.flush()
            else:
                stream.flush_now()
        finally:
            self.release()


def configure_logging(kind: str, level: str, stream=None) -> None:
    """The root logger writes ``kind`` lines to ``stream`` (standard error);
    the per-session ones batched per event-loop turn (SessionBatchingHandler)."""
    handler = SessionBatchingHandler(stream or sys.stderr)
    handler.setFormatter(formatter(kind))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Every record would otherwise look up its thread, process name and pid
    # (a system call): a session's log line is on the hot path.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (a walk up the stack): the logging HOWTO's optimization
