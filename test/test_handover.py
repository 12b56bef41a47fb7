"""A restart outside systemd in the other order: the old process is told to stop (and
drains a long connection) before the new one starts beside it (SO_REUSEPORT). The draining
listener must hand the port over to the newcomer, not reset the clients the kernel still
gives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from test_operations import REPO, echo_server, free_port, wait_for
from test_reload import roundtrips

TIMEOUT = 30.0


def start(tmp_path: Path, name: str, port: int, upstream: int) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port), "-r",
         f"127.0.0.1:{upstream}", "--disable-mptcp"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
        env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(lambda: "1 listener(s)" in log.read_text(), f"{name} listening")
    return proc, log


def test_a_draining_listener_hands_over_to_a_successor_started_after_the_stop(tmp_path):
    echo = echo_server(threaded=True)
    upstream, port = echo.getsockname()[1], free_port()
    old, old_log = start(tmp_path, "old", port, upstream)
    new = held = None
    try:
        held = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        held.sendall(b"held")
        assert held.recv(10) == b"held"
        old.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining 1 open connection" in old_log.read_text(), "the drain")
        new, new_log = start(tmp_path, "new", port, upstream)
        assert roundtrips(port, 40) == [b"ping"] * 40, "clients were reset by the draining process"
        held.sendall(b"again")
        assert held.recv(10) == b"again", "the draining connection was touched"
        held.close()
        held = None
        assert old.wait(TIMEOUT) == 0, old_log.read_text()
    finally:
        if held is not None:
            held.close()
        for proc in (old, new):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(TIMEOUT)
        echo.close()
    assert new.returncode == 0, new_log.read_text()
    assert "Traceback" not in old_log.read_text() + new_log.read_text()


def test_a_listener_on_another_address_of_the_port_is_no_successor(tmp_path):
    # Another program listens on the same port but another address: it takes none of
    # this listener's connections, so the drain must keep the socket open (for the MPTCP
    # joins of draining connections; new clients are reset) instead of closing it at once
    # as if handing over (new clients were refused).
    echo = echo_server(threaded=True)
    port = free_port()
    other = socket.socket()
    other.bind(("127.0.0.2", port))
    other.listen()
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-b", "127.0.0.1", "-p",
         str(port), "-r", f"127.0.0.1:{echo.getsockname()[1]}", "--disable-mptcp"],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
        env={**os.environ, "PYTHONPATH": str(REPO)})
    held = None
    try:
        wait_for(lambda: "1 listener(s)" in log.read_text(), "the proxy")
        held = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        held.sendall(b"held")
        assert held.recv(10) == b"held"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining 1 open connection" in log.read_text(), "the drain")
        assert roundtrips(port, 1) == [b"ConnectionResetError"], log.read_text()
        assert "handed over" not in log.read_text()
    finally:
        if held is not None:
            held.close()
        proc.wait(TIMEOUT)
        other.close()
        echo.close()
    assert proc.returncode == 0, log.read_text()
