"""The per-session log line without the logging module's machinery.

A server logs one INFO line per session.  Through ``Logger.info`` that line
costs a LogRecord, the handler chain and a Formatter; in a whole login+STAT
session that was the largest single item of the server's own CPU
(benchmarks/README.md, Session 8).  ``info`` writes the same line straight
to the stream when nothing could tell the difference: the text format's
handler, installed by fastpop.serve.logformat.configure_logging, is the
root logger's only handler, and no logger on the way has handlers or
filters of its own.  Anything else (the keyvalue and json formats, a test's
capturing handler, a filter) goes through ``Logger.info`` as before.

``stamp`` is the text format's time stamp (logging's default asctime, the
local time, milliseconds after a comma), used by the formatter too, so the
two paths cannot write different times.
"""

from __future__ import annotations

import logging
import time

# logging.Formatter's defaults, which the text format keeps
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

_handler: logging.StreamHandler | None = None  # the text format's, while it is the only one
_second = -1
_second_text = ""


def stamp(created: float) -> str:
    """``created`` (time.time()) as the text format writes it, the date and
    time formatted once per second."""
    global _second, _second_text
    second = int(created)
    if second != _second:
        _second_text = time.strftime(TIME_FORMAT, time.localtime(second))
        _second = second
    return f"{_second_text},{int((created - second) * 1000):03d}"


def use(handler: logging.StreamHandler | None) -> None:
    """The handler ``info`` may write through (None: always Logger.info)."""
    global _handler
    _handler = handler


def _direct(logger: logging.Logger, handler: logging.StreamHandler) -> bool:
    """Whether a record of ``logger`` would reach ``handler`` alone, unchanged."""
    root = logging.root
    if len(root.handlers) != 1 or root.handlers[0] is not handler or root.filters or handler.filters:
        return False
    if handler.level > logging.INFO:
        return False
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return False
        node = node.parent
    return True


def info(logger: logging.Logger, msg: str, args: tuple) -> None:
    """``logger.info(msg, *args)``, written straight to the stream when that
    writes the same line (see the module doc)."""
    handler = _handler
    if handler is None or not logger.isEnabledFor(logging.INFO) or not _direct(logger, handler):
        logger.info(msg, *args)
        return
    line = f"{stamp(time.time())} INFO {logger.name}: {msg % args}\n"
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):  # standard error closed or broken: dropped, as logging would
        pass
    finally:
        handler.release()
