"""structlog set-up: JSON lines (or console) on stderr, with request ids from contextvars.

Logging never fails the work it describes: a line that cannot be written (stderr on a full
device, a closed pipe) is dropped and counted (`broker_log_lines_dropped`), never raised into a
request. The standard library's loggers (aiohttp's) go through the same renderer, so every line
on stderr has one shape; a client's malformed HTTP request is one line, not a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from broker.config import LogConfig


class DroppedLines:
    """Lines that could not be written, process-wide (logging is configured per process)."""

    count = 0


def write_line(file: TextIO, line: str) -> None:
    """Write one line to `file`, or drop it and count it: never raises."""
    try:
        file.write(line + "\n")
        file.flush()
    except (OSError, ValueError):  # ENOSPC, EPIPE, EIO; ValueError: the file is closed
        DroppedLines.count += 1


class SafeLogger:
    """structlog's PrintLogger without the exceptions: writes one rendered line or drops it."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        write_line(self._file or sys.stderr, message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class SafeLoggerFactory:
    def __init__(self, file: TextIO | None = None) -> None:
        self._file = file

    def __call__(self, *args: Any) -> SafeLogger:
        return SafeLogger(self._file)


class _SafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's stream handler, dropping (and counting) what it cannot write
    instead of printing a traceback about it to the same failing stream."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            DroppedLines.count += 1
            return
        write_line(self.stream, line)


class _ClientErrors(logging.Filter):
    """aiohttp logs a client's malformed request ("Error handling request", a BadHttpMessage)
    with its traceback: keep one line with the reason, at warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = (exc.message or type(exc).__name__).strip().splitlines()
            record.msg = "bad_http_request: %s (%s)"
            record.args = (reason[0] if reason else type(exc).__name__, exc.code)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(config: LogConfig, file: TextIO | None = None) -> None:
    """Configure structlog and the standard library's logging for this process; `file` is
    where lines go (stderr, looked up at each write, when None)."""
    level = logging.getLevelNamesMapping().get(config.level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if config.format == "json"
        else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=SafeLoggerFactory(file),
        cache_logger_on_first_use=True,
    )
    handler = _SafeHandler(file or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    handler.addFilter(_ClientErrors())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
