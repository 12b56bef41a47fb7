"""The connection-end lines written together (connlog.log_ends, logsetup.line_writer) are
the lines the logging module writes one by one: same text, same JSON fields, same order."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from mptcpproxy import connlog, logsetup
from mptcpproxy.connlog import Conn
from mptcpproxy.relay._results import Result

ENDS = [
    (Result(1, 10, 20, 0.0123, "closed", 0, False, 0, ("127.0.0.1", 40000), 1),
     Conn(("127.0.0.1", 40000), ("127.0.0.1", 7000), False)),
    (Result(2, 0, 5, 1.5, "reset", 104, True, 2, ("::ffff:10.0.0.1", 40001), 1),
     Conn(("::ffff:10.0.0.1", 40001), ("2001:db8::2", 4444), True, via=("10.0.0.9", 5))),
    (Result(3, 7, 0, 0.0, "error", 110, False, 0, None, 1),
     Conn(("2001:db8::1", 1), ("name.example", 80), True)),
]


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sighup = signal.getsignal(signal.SIGHUP)
    yield
    for handler in logsetup._installed:
        handler.close()
    logsetup._installed.clear()
    root.handlers[:] = handlers
    root.setLevel(level)
    signal.signal(signal.SIGHUP, sighup)


def setup(path: Path, level: int = logging.INFO, log_format: str = "text") -> None:
    """setup_logging(), then the root logger with only its handler (pytest adds its own
    capturing handlers, which line_writer() rightly declines to bypass)."""
    logsetup.setup_logging(level, str(path), log_format)
    logging.getLogger().handlers[:] = logsetup._installed


def written(tmp_path: Path, log_format: str, together: bool) -> list[str]:
    path = tmp_path / f"{log_format}-{together}.log"
    setup(path, log_format=log_format)
    if together:
        assert logsetup.line_writer(connlog.log) is not None
        connlog.log_ends(ENDS)
    else:
        for r, conn in ENDS:
            connlog.log_end(r, conn)
    return path.read_text().splitlines()


def test_text_lines_together_are_the_lines_one_by_one(tmp_path: Path) -> None:
    one, many = written(tmp_path, "text", False), written(tmp_path, "text", True)
    assert len(many) == len(ENDS)
    # "2026-12-03 11:35:23,123 INFO conn 1 ...": the same but for the time
    assert [line.split(" ", 2)[2] for line in many] == [line.split(" ", 2)[2] for line in one]
    assert all(line[19] == "," and line[10] == " " for line in many)
    assert many[1].endswith("INFO conn 2 reset (connection reset by peer): client 10.0.0.1:40001"
                            " via 10.0.0.9:5 upstream [2001:db8::2]:4444 sent 0 B received 5 B"
                            " in 1.500 s, mptcp=yes subflows=2")


def test_json_lines_together_are_the_lines_one_by_one(tmp_path: Path) -> None:
    one = [json.loads(line) for line in written(tmp_path, "json", False)]
    many = [json.loads(line) for line in written(tmp_path, "json", True)]
    for a, b in zip(one, many, strict=True):
        assert b.pop("time").endswith("Z")
        a.pop("time")
        assert list(a.items()) == list(b.items())
    assert many[2]["reason"] == "error" and many[2]["mptcp"] is False


def test_another_handler_gets_every_record(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    setup(tmp_path / "p.log")
    logging.getLogger().addHandler(caplog.handler)
    assert logsetup.line_writer(connlog.log) is None
    connlog.log_ends(ENDS)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "conn 1 closed", "conn 2 reset (connection reset by peer)",
        "conn 3 error (connection timed out)"]
    assert [r.conn_id for r in caplog.records] == [1, 2, 3]


def test_nothing_below_info(tmp_path: Path) -> None:
    path = tmp_path / "q.log"
    setup(path, logging.WARNING)
    connlog.log_ends(ENDS)
    assert path.read_text() == ""


def test_sighup_reopens_before_the_next_batch(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    setup(path)
    assert logsetup.line_writer(connlog.log) is not None
    connlog.log_ends(ENDS[:1])
    path.rename(tmp_path / "r.log.1")
    logsetup._on_sighup(signal.SIGHUP, None)
    connlog.log_ends(ENDS[1:])
    assert len((tmp_path / "r.log.1").read_text().splitlines()) == 1
    assert len(path.read_text().splitlines()) == 2
