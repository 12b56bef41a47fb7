"""Logging set-up: `--log-file PATH` (reopened on SIGHUP, for logrotate) and
`--log-format text|json` (json: one object per line, with the `extra=` fields).

A connection-end line passes its fields with `extra=`; the text format shows only the
message, the json format adds the fields as keys::

    log.info("conn %d closed: %s", cid, reason, extra={"conn_id": cid, "reason": reason})
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from types import FrameType

from mptcpproxy.config import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(message)s"  # the journal timestamps each line itself
FORMATS = ("text", "json")

# The attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: a field that is not JSON (an address tuple, an enum) still logs
        return json.dumps(entry, default=str, ensure_ascii=False)


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that reopens its path after SIGHUP (logrotate's `postrotate`).

    The signal handler only sets a flag (no lock, no I/O: it may interrupt an emit); the
    next record reopens the file before it is written, so nothing goes to the rotated file
    after the signal. `reopen()` does it at once, for callers outside a signal handler.
    """

    def __init__(self, filename: str) -> None:
        super().__init__(filename, mode="a", encoding="utf-8")
        self._reopen_requested = False

    def request_reopen(self) -> None:
        """Async-signal-safe: mark the file to be reopened before the next record."""
        self._reopen_requested = True

    def reopen(self) -> None:
        """Reopen the file now (takes the handler lock)."""
        with self.lock:  # type: ignore[union-attr]
            self._reopen_locked()

    def _reopen_locked(self) -> None:
        self._reopen_requested = False
        try:
            stream = self._open()
        except OSError as exc:  # keep writing to the old file rather than nowhere
            sys.stderr.write(f"cannot reopen log file {self.baseFilename}: {exc.strerror}\n")
            return
        old, self.stream = self.stream, stream
        if old is not None:
            old.close()

    def emit(self, record: logging.LogRecord) -> None:
        if self._reopen_requested:  # handle() holds the lock here
            self._reopen_locked()
        super().emit(record)


_installed: list[logging.Handler] = []  # what setup_logging() added to the root logger


def _on_sighup(signum: int, frame: FrameType | None) -> None:
    for handler in list(_installed):
        if isinstance(handler, ReopenableFileHandler):
            handler.request_reopen()


def reopen_log_files() -> list[str]:
    """Reopen the log file now; for a control plane that handles SIGHUP itself. Returns
    the paths of the files reopened (none when logging goes to stderr)."""
    paths = []
    for handler in list(_installed):
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()
            paths.append(handler.baseFilename)
    return paths


def setup_logging(level: int = logging.INFO, log_file: str | None = None,
                  log_format: str = "text", handle_sighup: bool = True) -> logging.Handler:
    """Configure the root logger: stderr, or `log_file` reopened on SIGHUP; text or json.

    Replaces what an earlier call installed. Raises ConfigError (one sentence) when the
    log file cannot be opened or the format is unknown. Call from the main thread;
    `handle_sighup=False` once the control plane's loop handles SIGHUP itself. Text lines
    to stderr under systemd (JOURNAL_STREAM set) carry no time: the journal adds its own.
    """
    if log_format not in FORMATS:
        raise ConfigError(f"unknown log format '{log_format}' (use {' or '.join(FORMATS)})")
    handler: logging.Handler
    if log_file:
        try:
            handler = ReopenableFileHandler(log_file)
        except OSError as exc:
            raise ConfigError(f"cannot open log file '{log_file}': {exc.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    journal = not log_file and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(JOURNAL_FORMAT if journal else TEXT_FORMAT))
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    root.addHandler(handler)
    root.setLevel(level)
    if log_file and handle_sighup:
        # Until the control plane's loop takes SIGHUP over, it means "reopen" here.
        signal.signal(signal.SIGHUP, _on_sighup)
    return handler


# -- many records at once ---------------------------------------------------------------

Line = tuple[str, dict]  # a message, formatted, and its `extra=` fields


def line_writer(logger: logging.Logger) -> Callable[[Sequence[Line]], None] | None:
    """A writer of INFO lines for `logger` that formats them all at once and writes them
    with one call, as setup_logging()'s handler would have written them one by one; None
    when anything else could see the records (another handler or a filter: pytest's
    caplog, an embedding application), which then go through `logger` one by one.

    The logging module costs about 8 µs per record (LogRecord, caller lookup, format,
    a flush each); this writer about 1 µs a line, one write per batch. Its `fields`
    attribute says whether it writes the lines' fields (JSON) or only their messages."""
    root = logging.getLogger()
    if len(_installed) != 1 or root.handlers != _installed or root.filters:
        return None
    handler = _installed[0]
    if handler.filters or handler.level > logging.INFO or logging.root.manager.disable >= \
            logging.INFO:
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or not node.propagate:
            return None
        node = node.parent
    fmt = handler.formatter
    if isinstance(fmt, JsonFormatter):
        name = logger.name

        def lines(batch: Sequence[Line], now: float) -> str:
            stamp = datetime.fromtimestamp(now, timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            return "".join(json.dumps({"time": stamp, "level": "INFO", "logger": name,
                                       "message": msg, **extra}, default=str,
                                      ensure_ascii=False) + "\n" for msg, extra in batch)
    elif (type(fmt) is logging.Formatter and fmt._fmt in (TEXT_FORMAT, JOURNAL_FORMAT)
          and fmt.datefmt is None):
        timed = fmt._fmt == TEXT_FORMAT

        def lines(batch: Sequence[Line], now: float) -> str:
            # as logging.Formatter.formatTime() without a datefmt
            stamp = fmt.default_msec_format % (
                time.strftime(fmt.default_time_format, fmt.converter(now)),
                int((now - int(now)) * 1000))
            head = f"{stamp} INFO " if timed else "INFO "
            return "".join(f"{head}{msg}\n" for msg, _ in batch)
    else:
        return None

    def write(batch: Sequence[Line]) -> None:
        if not batch:
            return
        text = lines(batch, time.time())
        with handler.lock:  # type: ignore[union-attr]
            if isinstance(handler, ReopenableFileHandler) and handler._reopen_requested:
                handler._reopen_locked()
            try:
                handler.stream.write(text)  # type: ignore[attr-defined]
                handler.flush()
            except Exception:  # as logging does: a note on stderr, never an exception
                handler.handleError(logging.makeLogRecord(
                    {"name": logger.name, "levelno": logging.INFO, "levelname": "INFO",
                     "msg": batch[0][0]}))
    write.fields = isinstance(fmt, JsonFormatter)  # type: ignore[attr-defined]
    return write
