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

import json
import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from fastpop import logline

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
    """logging's text format, with the local time formatted once per second
    (fastpop.logline.stamp, which the session line's direct path uses too)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return logline.stamp(record.created)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JSONFormatter()
    if kind == "keyvalue":
        return KeyValueFormatter()
    if kind == "text":
        return TextFormatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {kind!r}")


def configure_logging(kind: str, level: str, stream=None) -> None:
    """The root logger writes ``kind`` lines to ``stream`` (standard error)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(kind))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # the session line may skip the logging machinery only in the text format
    logline.use(handler if kind == "text" else None)
    # Every record would otherwise look up its thread, process name and pid
    # (a system call): a session's log line is on the hot path.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (a walk up the stack): the logging HOWTO's optimization
