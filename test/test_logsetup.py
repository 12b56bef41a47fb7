"""Logging set-up: text and json lines, --log-file reopened on SIGHUP as logrotate needs;
the connection-end lines written together (connlog.log_ends, logsetup.line_writer) are the
lines the logging module writes one by one: same text, same JSON fields, same order."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mptcpproxy import connlog, logsetup
from mptcpproxy.config import ConfigError
from mptcpproxy.connlog import Conn
from mptcpproxy.relay._results import Result

log = logging.getLogger("mptcpproxy.test")


@pytest.fixture(autouse=True)
def restore_logging():
    """Give back the root logger and the SIGHUP disposition as they were."""
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


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_text_format_to_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    logsetup.setup_logging(logging.INFO, str(path))
    log.debug("not shown")
    log.info("listening on %s", "[::]:5555", extra={"port": 5555})
    (line,) = lines(path)
    assert line.endswith(" INFO listening on [::]:5555")


def test_json_lines_with_extra_fields(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    logsetup.setup_logging(logging.DEBUG, str(path), "json")
    log.info("conn %d closed: %s", 7, "reset", extra={
        "conn_id": 7, "reason": "reset", "bytes_client_to_upstream": 10,
        "is_mptcp": True, "peer": ("10.0.0.1", 40000)})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("relay failed")
    first, second = (json.loads(line) for line in lines(path))
    assert first["message"] == "conn 7 closed: reset"
    assert first["level"] == "INFO" and first["logger"] == "mptcpproxy.test"
    assert first["time"].endswith("Z") and first["time"][:4].isdigit()
    assert first["conn_id"] == 7 and first["reason"] == "reset"
    assert first["bytes_client_to_upstream"] == 10 and first["is_mptcp"] is True
    assert first["peer"] == ["10.0.0.1", 40000]
    assert not {"args", "msg", "levelno", "pathname", "exc_info"} & first.keys()
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_json_field_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "proxy.log"
    logsetup.setup_logging(logging.INFO, str(path), "json")
    log.info("odd", extra={"where": Path("/x"), "text": "é"})
    entry = json.loads(lines(path)[0])
    assert entry["where"] == "/x" and entry["text"] == "é"


def test_stderr_when_no_file(capfd: pytest.CaptureFixture[str]) -> None:
    logsetup.setup_logging(logging.WARNING, None, "json")
    log.info("hidden")
    log.warning("shown")
    (line,) = capfd.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "shown"


def test_sighup_reopens_after_rotation(tmp_path: Path) -> None:
    path, rotated = tmp_path / "proxy.log", tmp_path / "proxy.log.1"
    logsetup.setup_logging(logging.INFO, str(path))
    log.info("before rotation")
    path.rename(rotated)  # what logrotate does, then it sends SIGHUP
    log.info("after rename, before SIGHUP")  # still the open (renamed) file
    os.kill(os.getpid(), signal.SIGHUP)
    log.info("after SIGHUP")
    assert [line.split(" INFO ")[1] for line in lines(rotated)] == [
        "before rotation", "after rename, before SIGHUP"]
    assert [line.split(" INFO ")[1] for line in lines(path)] == ["after SIGHUP"]


def test_reopen_now_and_a_failed_reopen(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "proxy.log"
    handler = logsetup.setup_logging(logging.INFO, str(path))
    path.unlink()
    logsetup.reopen_log_files()
    assert path.exists()
    path.unlink()
    path.mkdir()  # a path that cannot be opened as a file, even by root
    logsetup.reopen_log_files()
    assert "cannot reopen log file" in capfd.readouterr().err
    log.info("still logged to the old file")  # no exception, no lost handler
    assert handler.stream is not None and not handler.stream.closed


def test_setup_twice_replaces_its_handler(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    logsetup.setup_logging(logging.INFO, str(first))
    logsetup.setup_logging(logging.INFO, str(second))
    log.info("once")
    assert first.read_text() == "" and len(lines(second)) == 1


def test_unopenable_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot open log file '.*/nodir/x.log': No such file"):
        logsetup.setup_logging(logging.INFO, str(tmp_path / "nodir" / "x.log"))
    with pytest.raises(ConfigError, match="unknown log format 'xml'"):
        logsetup.setup_logging(logging.INFO, None, "xml")


def test_sighup_in_a_process_does_not_kill_it(tmp_path: Path) -> None:
    """The daemon's view: SIGHUP while it runs reopens the file and the process lives on."""
    path = tmp_path / "proxy.log"
    script = (
        "import logging, os, signal, sys\n"
        "from mptcpproxy import logsetup\n"
        f"logsetup.setup_logging(logging.INFO, {str(path)!r}, 'json')\n"
        "logging.info('one')\n"
        f"os.rename({str(path)!r}, {str(path)!r} + '.1')\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "logging.info('two')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads(lines(path)[0])["message"] == "two"


# -- connection-end lines written together --------------------------------------------

ENDS = [
    (Result(1, 10, 20, 0.0123, "closed", 0, False, 0, ("127.0.0.1", 40000), 1),
     Conn(("127.0.0.1", 40000), ("127.0.0.1", 7000), False)),
    (Result(2, 0, 5, 1.5, "reset", 104, True, 2, ("::ffff:10.0.0.1", 40001), 1),
     Conn(("::ffff:10.0.0.1", 40001), ("2001:db8::2", 4444), True, via=("10.0.0.9", 5))),
    (Result(3, 7, 0, 0.0, "error", 110, False, 0, None, 1),
     Conn(("2001:db8::1", 1), ("name.example", 80), True)),
]


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
