"""SIGHUP with --config under traffic: listeners added, removed (drained) and changed, a
broken file that leaves the running configuration alone; sha256-checked transfers that
run across every reload are intact."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_operations import REPO, echo_server, free_port, wait_for
from test_operations import roundtrip as operations_roundtrip

TIMEOUT = 30.0
MiB = 1 << 20


def write_config(path: Path, listeners: list[dict], **top) -> None:
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in top.items()]
    for lst in listeners:
        lines.append("\n[[listener]]")
        for k, v in lst.items():
            value = str(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"')
            lines.append(f"{k} = {value}")
    path.write_text("\n".join(lines) + "\n")


class Proxy:
    def __init__(self, tmp_path: Path, config: Path, *extra: str) -> None:
        self.log = tmp_path / "proxy.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mptcpproxy", "--config", str(config), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, count: int = 1) -> str:
        return wait_for(lambda: self.text().count(needle) >= count and self.text(),
                        f"{needle!r} x{count} in the log:\n{self.text()}")

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(TIMEOUT)


class Transfer(threading.Thread):
    """`size` random bytes through the proxy to the echo service and back, slowly (so it
    spans the reloads), sha256-checked both ways."""

    def __init__(self, port: int, size: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.size, self.seconds = port, size, seconds
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.received = self.nsent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            reader = threading.Thread(target=self._read, daemon=True)
            reader.start()
            rnd, chunks = random.Random(self.port), 50
            for _ in range(chunks):
                block = rnd.randbytes(self.size // chunks)
                self.sock.sendall(block)
                self.sent.update(block)
                self.nsent += len(block)
                time.sleep(self.seconds / chunks)
            self.sock.shutdown(socket.SHUT_WR)
            reader.join(TIMEOUT)
        except BaseException as exc:  # reported by intact()
            self.error = exc

    def _read(self) -> None:
        while data := self.sock.recv(MiB):
            self.got.update(data)
            self.received += len(data)

    def intact(self) -> bool:
        self.join(TIMEOUT)
        self.sock.close()
        assert self.error is None, self.error
        return self.received == self.nsent > 0 and self.got.digest() == self.sent.digest()


def roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    return operations_roundtrip(port, payload, proto=0)


def roundtrips(port: int, count: int) -> list[bytes]:
    """`count` roundtrips one after the other: each answer, or the name of the error."""
    answers = []
    for _ in range(count):
        try:
            answers.append(roundtrip(port))
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            answers.append(type(exc).__name__.encode())
    return answers


def refused_or_reset(port: int) -> bool:
    try:
        return roundtrip(port) == b""
    except (ConnectionRefusedError, ConnectionResetError):
        return True


@pytest.mark.parametrize("mode", ["fast", "control"])
def test_reload_adds_removes_and_changes_listeners_under_traffic(tmp_path, mode):
    echo = echo_server()
    upstream = f"127.0.0.1:{echo.getsockname()[1]}"
    keep, gone, new = free_port(), free_port(), free_port()
    extra = {} if mode == "fast" else {"max_connections": 1000}  # the control plane's path
    config = tmp_path / "proxy.toml"
    write_config(config, [
        {"name": "keep", "mode": "client", "port": keep, "remote": upstream,
         "disable_mptcp": True, **extra},
        {"name": "gone", "mode": "client", "port": gone, "remote": upstream,
         "disable_mptcp": True, **extra},
    ], workers=2)
    proxy = Proxy(tmp_path, config)
    try:
        proxy.wait_log("2 listener(s)")
        assert roundtrip(keep) == b"ping" and roundtrip(gone) == b"ping"
        across = [Transfer(keep, 4 * MiB, 3.0), Transfer(gone, 4 * MiB, 3.0)]
        for t in across:
            t.start()
        # 1. remove "gone", add "new", change "keep" (a new idle timeout for new clients)
        write_config(config, [
            {"name": "keep", "mode": "client", "port": keep, "remote": upstream,
             "disable_mptcp": True, "idle_timeout": 600, **extra},
            {"name": "new", "mode": "client", "port": new, "remote": upstream,
             "disable_mptcp": True, **extra},
        ], workers=2)
        proxy.hup()
        proxy.wait_log("1 added, 1 removed, 0 replaced, 1 changed")
        assert roundtrip(new) == b"ping"
        assert roundtrip(keep) == b"ping"
        assert refused_or_reset(gone), "the removed listener still serves new clients"
        # 2. a broken file: logged, the running configuration stays
        config.write_text(config.read_text() + "\nretries = 3\n")
        proxy.hup()
        text = proxy.wait_log("reload failed")
        assert f"{config}:" in text and "retries: unknown key" in text
        assert "the running configuration stays" in text
        assert roundtrip(new) == b"ping" and roundtrip(keep) == b"ping"
        # the transfers that ran across both reloads, "gone"'s included, are whole
        assert [t.intact() for t in across] == [True, True]
        proxy.wait_log("listener gone: closed, its last connection ended")
        assert refused_or_reset(gone)
        assert proxy.proc.poll() is None
    finally:
        rc = proxy.stop()
        echo.close()
    assert rc == 0, proxy.text()
    assert "Traceback" not in proxy.text()


def test_reload_replaces_a_listener_whose_socket_changes(tmp_path):
    # client -> server mode on the same port: a new socket (MPTCP) beside the old one
    echo = echo_server()
    upstream = f"127.0.0.1:{echo.getsockname()[1]}"
    port = free_port()
    config = tmp_path / "proxy.toml"
    write_config(config, [{"mode": "client", "port": port, "remote": upstream,
                           "disable_mptcp": True}])
    proxy = Proxy(tmp_path, config)
    try:
        proxy.wait_log("1 listener(s)")
        held = Transfer(port, MiB, 2.0)
        held.start()
        write_config(config, [{"mode": "server", "port": port, "remote": upstream}])
        proxy.hup()
        proxy.wait_log("0 added, 0 removed, 1 replaced, 0 changed")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262) as c:  # MPTCP now
            c.settimeout(TIMEOUT)
            c.connect(("127.0.0.1", port))
            c.sendall(b"mptcp")
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == b"mptcp"
        assert held.intact()
    finally:
        rc = proxy.stop()
        echo.close()
    assert rc == 0, proxy.text()


def test_sighup_without_config_reopens_or_is_ignored(tmp_path):
    echo = echo_server()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", str(port), "-r",
         f"127.0.0.1:{echo.getsockname()[1]}", "--disable-mptcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: not refused_or_reset(port), "the proxy")
        proc.send_signal(signal.SIGHUP)
        assert roundtrip(port) == b"ping"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
        echo.close()
    assert proc.returncode == 0
    assert b"no configuration file (--config) to reload; ignored" in err


def echo_listener() -> tuple[socket.socket, dict, int]:
    """A threaded echo service, a TCP client listener (as a [[listener]] table) on a free
    port forwarding to it, and another free port."""
    echo = echo_server(threaded=True)
    listener = {"mode": "client", "port": free_port(), "disable_mptcp": True,
                "remote": f"127.0.0.1:{echo.getsockname()[1]}"}
    return echo, listener, free_port()


def test_a_port_added_back_while_its_old_listener_drains_resets_nothing(tmp_path):
    # Removed, then added back by the next reload while a connection of the old listener is
    # still open: the draining socket shares the port (SO_REUSEPORT) and reset the new
    # clients the kernel gave it (15 of 40 before the fix).
    echo, listener, other = echo_listener()
    port, config = listener["port"], tmp_path / "proxy.toml"
    write_config(config, [listener])
    proxy = Proxy(tmp_path, config)
    held = None
    try:
        proxy.wait_log("1 listener(s)")
        held = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        held.sendall(b"held")
        assert held.recv(10) == b"held"
        write_config(config, [{**listener, "port": other}])  # the file needs a listener
        proxy.hup()
        proxy.wait_log("1 added, 1 removed")
        write_config(config, [listener])
        proxy.hup()
        proxy.wait_log("1 added, 1 removed", count=2)
        assert roundtrips(port, 40) == [b"ping"] * 40, "new clients were reset"
        held.sendall(b"again")
        assert held.recv(10) == b"again", "the old listener's open connection was touched"
    finally:
        if held is not None:
            held.close()
        rc = proxy.stop()
        echo.close()
    assert rc == 0, proxy.text()
    assert "Traceback" not in proxy.text()


def test_a_reload_during_the_stop_grace_changes_nothing(tmp_path):
    # SIGHUP after the stop signal (a logrotate or `systemctl reload` racing a stop): the
    # proxy is leaving, so the file is not applied: a listener it adds would open (and
    # install its firewall rules) after the others stopped diverting. Before the fix the
    # added port accepted during the grace.
    echo, listener, other = echo_listener()
    port, config = listener["port"], tmp_path / "proxy.toml"
    write_config(config, [listener], stop_grace=5)
    proxy = Proxy(tmp_path, config)
    try:
        proxy.wait_log("1 listener(s)")
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_log("--stop-grace")
        write_config(config, [listener, {**listener, "port": other}], stop_grace=5)
        proxy.hup()
        wait_for(lambda: "SIGHUP: stopping" in proxy.text() or "reload:" in proxy.text(),
                 "the SIGHUP handled")
        assert refused_or_reset(other), "a listener was added while stopping"
        assert roundtrip(port) == b"ping", "the grace no longer accepts"
    finally:
        rc = proxy.stop()
        echo.close()
    assert rc == 0, proxy.text()
    assert "reload:" not in proxy.text()
