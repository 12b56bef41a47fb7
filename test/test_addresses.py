"""IPv6 literals with a scope (fe80::1%eth0) and addresses the kernel refuses to bind: each
works, or ends in one line that names the address; never a traceback or a word about MPTCP
when MPTCP is not the problem."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
from test_cli import assert_one_line_error, proxy
from test_operations import REPO, TIMEOUT, free_port, wait_for

ECHO_BYTES = b"scoped"


def _v6_echo() -> socket.socket:
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen()

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT)
            conn.sendall(conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize("path", ["fast", "control"])
def test_an_upstream_with_a_scope_is_relayed(tmp_path, path):
    # -r [::1%lo]:PORT (a link-local address needs one; lo stands in for eth0): the relay
    # workers' own connect took it to inet_pton and died with a traceback at start-up.
    echo = _v6_echo()
    port = free_port()
    extra = ["--max-connections", "10"] if path == "control" else []
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port), "-b",
         "127.0.0.1", "-r", f"[::1%lo]:{echo.getsockname()[1]}", "--disable-mptcp", *extra],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env={"PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: "1 listener(s)" in log.read_text() or proc.poll() is not None,
                 "the proxy")
        assert proc.poll() is None, log.read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as c:
            c.sendall(ECHO_BYTES)
            assert c.recv(100) == ECHO_BYTES
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)
        echo.close()
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_an_upstream_scope_naming_no_interface_is_one_line():
    assert_one_line_error(
        proxy("-m", "client", "-p", str(free_port()), "-r", "[fe80::1%nosuchif0]:80"), 1,
        "fe80::1%nosuchif0", "nosuchif0")


@pytest.mark.parametrize("bind, words", [
    ("fe80::1%nosuchif0", ["fe80::1%nosuchif0", "nosuchif0"]),
    ("fe80::1", ["fe80::1", "interface"]),  # EINVAL: a link-local address needs its scope
])
def test_a_bind_address_the_kernel_refuses_is_named(bind, words):
    proc = proxy("-m", "client", "-p", str(free_port()), "-b", bind, "-r", "127.0.0.1:80")
    assert_one_line_error(proc, 1, *words)
    assert "MPTCP" not in proc.stderr and "Unknown error" not in proc.stderr
