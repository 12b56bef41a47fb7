"""End to end: a real proxy with --metrics, --log-file/--log-format json and $NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from test_metrics import samples, value

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_server(threaded: bool = False) -> socket.socket:
    """An echo service on 127.0.0.1; one connection at a time unless `threaded`."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(TIMEOUT)

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                if not threaded:
                    raise

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if threaded:
                threading.Thread(target=echo, args=(conn,), daemon=True).start()
            else:
                echo(conn)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
        return r.read().decode()


def wait_for(pred, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def roundtrip(port: int, payload: bytes = b"ping", proto: int = 262) -> bytes:
    """`payload` to 127.0.0.1:port (MPTCP unless `proto` says otherwise), half-close, and
    everything that comes back."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto) as c:
        c.settimeout(TIMEOUT)
        c.connect(("127.0.0.1", port))
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while data := c.recv(65536):
            got += data
        return got


def test_proxy_operations(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(TIMEOUT)
    upstream = echo_server()
    port, mport = free_port(), free_port()
    log = tmp_path / "proxy.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "server", "-p", str(port), "-b", "127.0.0.1",
         "-r", f"127.0.0.1:{upstream.getsockname()[1]}", "--metrics", f"127.0.0.1:{mport}",
         "--log-file", str(log), "--log-format", "json", "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert notify.recv(4096) == b"READY=1"
        assert roundtrip(port, b"x" * 100000) == b"x" * 100000
        def closed_once() -> dict | None:
            got = samples(scrape(mport))
            return got if value(got, "mptcpproxy_connections_closed_total",
                                reason="closed") == 1 else None

        got = wait_for(closed_once, "the closed connection in the metrics")
        assert value(got, "mptcpproxy_connections_accepted_total") == 1
        assert value(got, "mptcpproxy_bytes_total", direction="client_to_upstream") == 100000
        assert value(got, "mptcpproxy_mptcp_leg_connections_total", result="mptcp") == 1
        assert ("mptcpproxy_worker_pairs_total", (("worker", "1"),)) in got
        assert value(got, "mptcpproxy_connections_active") == 0
        assert got[("process_open_fds", ())] > 0
        # logrotate: rename, SIGHUP, the next line lands in a new file
        log.rename(tmp_path / "proxy.log.1")
        proc.send_signal(signal.SIGHUP)
        assert roundtrip(port, b"hello") == b"hello"
        end = wait_for(lambda: [e for e in map(json.loads, log.read_text().splitlines())
                                if e.get("event") == "conn_end"] if log.exists() else None,
                       "the conn_end line in the reopened log")
        assert end[0]["bytes_client_to_upstream"] == 5 and end[0]["mptcp"] is True
        assert end[0]["reason"] == "closed" and end[0]["message"].startswith("conn 2 closed")
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out, err = proc.communicate(timeout=TIMEOUT)
        print(out, err)
        notify.close()
        upstream.close()
