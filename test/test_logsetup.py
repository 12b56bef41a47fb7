"""Logging set-up: text and json lines, --log-file reopened on SIGHUP as logrotate needs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mptcpproxy import logsetup
from mptcpproxy.config import ConfigError

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
