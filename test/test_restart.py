"""Socket activation (systemd's LISTEN_FDS, from a real systemd-socket-activate and from a
holder that passes an MPTCP listener the same way) and restarts that refuse nothing: under
a steady 100 connections a second the proxy is restarted, through socket activation and
through SO_REUSEPORT, and not one connection is refused or reset."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
import time

import pytest
from netns import wait_until

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers.py")
RATELOAD = os.path.join(HERE, "rateload.py")
SERVICE, PORT = 7000, 5555
RATE, SECONDS = 100, 5

# Holds listening sockets like systemd does and runs the proxy with them (LISTEN_FDS):
# `holder.py PROTO PORT NAME CONFIG` starts the proxy with the socket as fd 3; each
# SIGUSR1 stops it (SIGTERM, wait) and starts a new one with the same socket.
HOLDER = textwrap.dedent("""
    import os, signal, socket, subprocess, sys
    proto, port, name, config = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM, proto)
    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lsock.bind(("::", port))
    lsock.listen(4096)
    os.set_inheritable(lsock.fileno(), True)

    def spawn():
        def child():
            os.dup2(lsock.fileno(), 3)
            os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()),
                              LISTEN_FDNAMES=name)
        return subprocess.Popen([sys.executable, "-m", "mptcpproxy", "--config", config],
                                preexec_fn=child, pass_fds=(3,) if lsock.fileno() == 3 else ())
    proc = spawn()
    restarts = 0

    def restart(*_):
        global proc, restarts
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc = spawn()
        restarts += 1
        print("restarted", restarts, flush=True)

    def stop(*_):
        proc.send_signal(signal.SIGTERM)
        sys.exit(proc.wait(60))

    signal.signal(signal.SIGUSR1, restart)
    signal.signal(signal.SIGTERM, stop)
    print("holding", flush=True)
    while True:
        signal.pause()
""")


def _config(tmp_path, mode: str, name: str | None = None, extra: str = "") -> str:
    path = tmp_path / f"{mode}.toml"
    path.write_text(textwrap.dedent(f"""\
        drain_timeout = 10
        [[listener]]
        {f'name = "{name}"' if name else ''}
        mode = "{mode}"
        port = {PORT}
        remote = "127.0.0.1:{SERVICE}"
        {extra}
    """))
    os.chmod(tmp_path, 0o755)
    return str(path)


def _host_with_echo(testbed):
    host = testbed.host("lo")
    svc = host.start([sys.executable, PEERS, "echo", str(SERVICE)], name="service")
    host.wait_listening(SERVICE, proc=svc)
    return host


def _roundtrip(host, proto: int = 0) -> str:
    probe = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, {proto})
        s.settimeout(10)
        s.connect(("127.0.0.1", {PORT}))
        s.sendall(b"activated")
        s.shutdown(socket.SHUT_WR)
        print(s.recv(100).decode(), s.getsockopt(socket.IPPROTO_TCP, 43))
    """)
    return host.run([sys.executable, "-c", probe], timeout=30).stdout.strip()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="needs systemd-socket-activate (package systemd)")
def test_systemd_socket_activate_passes_the_listener(testbed, tmp_path):
    host = _host_with_echo(testbed)
    config = _config(tmp_path, "client", name="web", extra="disable_mptcp = true")
    proxy = host.start(["systemd-socket-activate", "-l", f"127.0.0.1:{PORT}", "--fdname=web",
                        sys.executable, "-m", "mptcpproxy", "--config", config], name="proxy")
    # it holds the socket and starts the proxy at the first connection, as systemd does
    host.wait_listening(PORT, proc=proxy)
    assert _roundtrip(host) == "activated 0"
    wait_until(lambda: "1 listener(s)" in proxy.stderr, 30, "the proxy")
    assert "socket from systemd: web" in proxy.stderr, proxy.stderr
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(30) == 0, proxy.describe()


def _server_held(testbed, tmp_path, proto: int, until: str):
    """A server-mode proxy whose listener (`proto`) a holder passes, as systemd would."""
    host = _host_with_echo(testbed)
    config = _config(tmp_path, "server", name="mp")
    holder = host.start([sys.executable, "-c", HOLDER, str(proto), str(PORT), "mp", config],
                        name="holder")
    wait_until(lambda: until in holder.stderr, 30, f"{until!r} from the proxy")
    return host, holder


def test_an_mptcp_listener_passed_by_socket_activation(testbed, tmp_path):
    host, holder = _server_held(testbed, tmp_path, 262, "1 listener(s)")
    assert _roundtrip(host, 262) == "activated 1"  # the client's side really is MPTCP
    assert "socket from systemd: mp" in holder.stderr, holder.stderr
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(30) == 0, holder.describe()


def test_a_tcp_socket_for_a_server_listener_names_the_fix(testbed, tmp_path):
    _, holder = _server_held(testbed, tmp_path, 6, "error")
    assert "add SocketProtocol=mptcp to the .socket unit" in holder.stderr, holder.stderr
    assert "Traceback" not in holder.stderr
    holder.stop()


def _load(host) -> dict:
    out = host.run([sys.executable, RATELOAD, "127.0.0.1", str(PORT), str(RATE), str(SECONDS)],
                   timeout=SECONDS + 90).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["client", "server"])
def test_restart_under_load_refuses_nothing_with_socket_activation(testbed, tmp_path, mode):
    host = _host_with_echo(testbed)
    if mode == "server":  # the client proxy in front gives the load an MPTCP leg
        front = host.start([sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", "6666",
                            "-r", f"127.0.0.1:{PORT}"], name="front")
        host.wait_listening(6666, proc=front)
    config = _config(tmp_path, mode, name="svc")
    holder = host.start([sys.executable, "-c", HOLDER, "262" if mode == "server" else "6",
                         str(PORT), "svc", config], name="holder")
    wait_until(lambda: "1 listener(s)" in holder.stderr, 30, "the proxy")
    port = 6666 if mode == "server" else PORT
    load = host.start([sys.executable, RATELOAD, "127.0.0.1", str(port), str(RATE),
                       str(SECONDS)], name="load")
    for n in (1, 2):
        time.sleep(SECONDS / 3)
        holder.send_signal(signal.SIGUSR1)
        wait_until(lambda n=n: f"restarted {n}" in holder.stdout, 60, f"restart {n}")
    assert load.wait(SECONDS + 90) == 0, load.describe()
    result = json.loads(load.stdout.strip().splitlines()[-1])
    assert holder.stderr.count("1 listener(s)") == 3, holder.stderr
    assert result == {"ok": RATE * SECONDS, "failed": {}, "unfinished": 0}, result
    print("socket activation restart:", mode, result)


def test_restart_under_load_refuses_nothing_with_so_reuseport(testbed, tmp_path):
    # TCP listeners: the old process closes its listener as soon as it is told to stop;
    # net.ipv4.tcp_migrate_req moves the connections queued on it to the new process.
    host = _host_with_echo(testbed)
    host.sysctl("net.ipv4.tcp_migrate_req", 1)
    config = _config(tmp_path, "client")
    argv = [sys.executable, "-m", "mptcpproxy", "--config", config]
    old = host.start(argv, name="old")
    wait_until(lambda: "1 listener(s)" in old.stderr, 30, "the first proxy")
    load = host.start([sys.executable, RATELOAD, "127.0.0.1", str(PORT), str(RATE),
                       str(SECONDS)], name="load")
    for n in (1, 2):
        time.sleep(SECONDS / 3)
        new = host.start(argv, name=f"new{n}")
        wait_until(lambda new=new: "1 listener(s)" in new.stderr, 30, "the new proxy")
        old.send_signal(signal.SIGTERM)  # the systemd-less restart: new first, then stop
        assert old.wait(60) == 0, old.describe()
        old = new
    assert load.wait(SECONDS + 90) == 0, load.describe()
    result = json.loads(load.stdout.strip().splitlines()[-1])
    old.send_signal(signal.SIGTERM)
    assert old.wait(60) == 0, old.describe()
    assert result == {"ok": RATE * SECONDS, "failed": {}, "unfinished": 0}, result
    print("SO_REUSEPORT restart:", result)
