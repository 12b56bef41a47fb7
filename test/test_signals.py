"""SIGHUP as systemd's ExecReload and logrotate's postrotate send it: never fatal. With
--log-file it reopens the file; without, it is logged and ignored. The proxy still relays,
and SIGTERM still stops it with exit 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_operations import TIMEOUT, echo_server, free_port, roundtrip, wait_for

REPO = Path(__file__).resolve().parent.parent
HANGUPS = 3


def accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return False
    return True


@pytest.mark.parametrize("path", ["fast", "control"], ids=["fast", "control"])
@pytest.mark.parametrize("log_file", [False, True], ids=["stderr", "log-file"])
def test_sighup_is_never_fatal(tmp_path: Path, log_file: bool, path: str) -> None:
    upstream = echo_server()
    port = free_port()
    log = tmp_path / "proxy.log"
    argv = [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port),
            "-b", "127.0.0.1", "-r", f"127.0.0.1:{upstream.getsockname()[1]}",
            "--disable-mptcp", "--workers", "1"]
    if path == "control":  # a limit takes the control plane's accept path
        argv += ["--max-connections", "100"]
    if log_file:
        argv += ["--log-file", str(log)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    err = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err)

    def stderr_text() -> str:
        return (tmp_path / "stderr").read_text()

    try:
        # "listening on" comes once the signal handlers are in place (a SIGHUP before is
        # ignored, or only reopens the file, without a line to wait for)
        wait_for(lambda: "listening on" in (log.read_text() if log.exists() else stderr_text())
                 or proc.poll() is not None, "the start-up line")
        for i in range(HANGUPS):
            if log_file:  # logrotate: rename, then SIGHUP; the next lines go to a new file
                log.rename(tmp_path / f"proxy.log.{i + 1}")
            proc.send_signal(signal.SIGHUP)
            payload = f"after hangup {i}".encode()
            assert roundtrip(port, payload) == payload, proc.poll()
            # the proxy says it saw this one (signals sent closer together may merge)
            if log_file:
                wait_for(lambda: log.exists() and "SIGHUP" in log.read_text(),
                         "the SIGHUP line in the reopened log file")
            else:
                wait_for(lambda n=i + 1: stderr_text().count("SIGHUP") == n or proc.poll(),
                         "the SIGHUP line")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        err.close()
        stderr = stderr_text()
        upstream.close()
    text = log.read_text() if log_file else stderr
    assert "Traceback" not in stderr + text
    if log_file:
        # each rotated file ends where its SIGHUP came; the current one holds the rest
        assert "stopped" in text and "SIGHUP" in text
        assert "listening on" in (tmp_path / "proxy.log.1").read_text()
    else:
        assert text.count("SIGHUP: no log file to reopen") == HANGUPS, text


def test_sighup_during_startup_is_not_fatal(tmp_path: Path) -> None:
    """SIGHUP all along the start-up: the proxy comes up all the same."""
    upstream = echo_server()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The signals start once the process has written a line to its stdout, which a wrapper
    # does as soon as main() has set up logging, right after parsing the arguments.
    wrapper = (
        "import sys\n"
        "from mptcpproxy import cli\n"
        "setup = cli.logsetup.setup_logging\n"
        "def setup_logging(*args):\n"
        "    handler = setup(*args)\n"
        "    sys.stdout.write('logging\\n'); sys.stdout.flush()\n"
        "    return handler\n"
        "cli.logsetup.setup_logging = setup_logging\n"
        "raise SystemExit(cli.main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, "-m", "client", "-p", str(port), "-b", "127.0.0.1",
         "-r", f"127.0.0.1:{upstream.getsockname()[1]}", "--disable-mptcp", "--workers", "1"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout.readline() == "logging\n"
        # Hang up all along the start-up, until the proxy serves.
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and not accepting(port):
            assert time.monotonic() < deadline, "the proxy did not start"
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.001)
        assert proc.poll() is None, proc.returncode
        assert roundtrip(port, b"up") == b"up"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=TIMEOUT)
        upstream.close()
    assert "Traceback" not in stderr
