"""systemd: the sd_notify helper against a unix datagram socket we bind, and the template
units (the service, and the sockets for socket activation) checked by `systemd-analyze
verify` and `systemd-analyze security --offline`."""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mptcpproxy.sdnotify import sd_notify

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
UNIT = CONTRIB / "mptcp-proxy@.service"
TCP_SOCKET = CONTRIB / "mptcp-proxy@.socket"
MPTCP_SOCKET = CONTRIB / "mptcp-proxy-mptcp@.socket"
PROGRAM = "/opt/mptcp-proxy/bin/mptcp-proxy"  # the virtualenv of `make install`
TIMEOUT = 30.0


# -- sd_notify ----------------------------------------------------------------------------------

@pytest.fixture
def receiver():
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        yield sock


def test_notify_to_a_path(receiver: socket.socket, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    receiver.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sd_notify("READY=1")
    assert sd_notify("STATUS=relaying 3 connections\nSTOPPING=1")
    assert receiver.recv(4096) == b"READY=1"
    assert receiver.recv(4096) == b"STATUS=relaying 3 connections\nSTOPPING=1"


def test_notify_to_an_abstract_name(receiver: socket.socket,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mptcpproxy-test-{secrets.token_hex(6)}"
    receiver.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert sd_notify("READY=1")
    assert receiver.recv(4096) == b"READY=1"


def test_no_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify("READY=1") is False


@pytest.mark.parametrize("value, words", [
    ("/nonexistent/notify", "cannot notify systemd (READY=1)"),
    ("vsock:2:1234", "is not a unix socket"),
])
def test_unreachable_socket_is_logged_not_raised(
        value: str, words: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.WARNING, "mptcpproxy.sdnotify"):
        assert sd_notify("READY=1") is False
    assert words in caplog.text


def test_full_receiver_does_not_block(receiver: socket.socket, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    receiver.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    sent = [sd_notify("STATUS=" + "x" * 4000) for _ in range(200)]  # nobody reads
    assert sent[0] and not sent[-1]  # the queue filled up: refused, not blocked


# -- the unit -----------------------------------------------------------------------------------

def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_unit_says_what_the_daemon_needs() -> None:
    s = unit_settings()
    assert s["Service.Type"] == ["notify"]
    config = "/etc/mptcp-proxy/%i.toml"
    assert s["Service.ExecStart"] == [f"{PROGRAM} --config {config}"]
    # reload: a file with a mistake fails `systemctl reload` before any signal is sent
    assert s["Service.ExecReload"] == [f"{PROGRAM} --config {config} --check-config",
                                       "kill -HUP $MAINPID"]
    assert s["Service.ExecStartPre"] == [f"-{PROGRAM} --check"]  # never fatal
    assert s["Service.Restart"] == ["on-failure"]
    assert s["Service.RestartPreventExitStatus"] == ["2"]  # usage error: not transient
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(s["Service.CapabilityBoundingSet"][0].split()) == caps
    assert set(s["Service.AmbientCapabilities"][0].split()) == caps
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")]:
        assert s[f"Service.{key}"] == [value]
    assert "AF_NETLINK" in s["Service.RestrictAddressFamilies"][0]  # ip, nft
    assert "AF_UNIX" in s["Service.RestrictAddressFamilies"][0]  # $NOTIFY_SOCKET


@pytest.fixture
def checkable_unit(tmp_path: Path) -> Path:
    """The unit with its commands pointing at a stub: `verify` insists that they exist,
    and mptcp-proxy need not be installed where the tests run."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    stub = tmp_path / "mptcp-proxy"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert PROGRAM in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(PROGRAM, str(stub)))
    return unit


def analyze(unit: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # the man page is installed with the package, not where the tests run: --man=no
    return subprocess.run(["systemd-analyze", *args, str(unit)], cwd=unit.parent,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_systemd_analyze_verify(checkable_unit: Path) -> None:
    res = analyze(checkable_unit, "verify", "--man=no")
    # verify exits 0 on unknown keys and bad values: its warnings name the file
    assert res.returncode == 0 and checkable_unit.name not in res.stderr, res.stderr
    assert not res.stderr.strip(), res.stderr


def test_systemd_analyze_verify_catches_a_typo(checkable_unit: Path) -> None:
    # the check above can fail: a misspelt key is reported
    checkable_unit.write_text(checkable_unit.read_text().replace("NoNewPrivileges=",
                                                                 "NoNewPrivilege="))
    res = analyze(checkable_unit, "verify", "--man=no")
    assert "Unknown key 'NoNewPrivilege'" in res.stderr


def test_exposure_level_is_low(checkable_unit: Path) -> None:
    res = analyze(checkable_unit, "security", "--offline=yes", "--no-pager")
    if "--offline" in res.stderr and "unrecognized" in res.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    # 10 is an unhardened service; the network capabilities the proxy keeps cost ~1.5
    assert float(m.group(1)) <= 2.5, res.stdout


def test_example_config_in_the_header_is_valid(tmp_path: Path) -> None:
    """The example NAME.toml in the unit's header comment loads as a configuration file."""
    lines = UNIT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "for example" in line) + 1
    example = []
    for line in lines[start:]:
        if not line.startswith("#     "):
            break
        example.append(line[6:])
    assert any(line.startswith("[[listener]]") for line in example), example
    path = tmp_path / "NAME.toml"
    path.write_text("\n".join(example) + "\n")
    from mptcpproxy.configfile import load

    (listener,) = load(str(path)).listeners
    assert (listener.mode, listener.port) == ("client", 5555)


# -- the socket units (socket activation) ---------------------------------------------------------

def systemd_version() -> int:
    res = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    m = re.search(r"systemd (\d+)", res.stdout)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("socket_unit, protocol", [(TCP_SOCKET, None), (MPTCP_SOCKET, "mptcp")],
                         ids=["tcp", "mptcp"])
def test_socket_units_feed_the_service(socket_unit: Path, protocol: str | None) -> None:
    s = unit_settings(socket_unit)
    assert s["Socket.Service"] == ["mptcp-proxy@%i.service"]
    assert s.get("Socket.SocketProtocol") == ([protocol] if protocol else None)
    assert all(port.isdigit() for port in s["Socket.ListenStream"]), s["Socket.ListenStream"]
    # dual-stack like a listener without `bind`, whatever net.ipv6.bindv6only says
    assert s["Socket.BindIPv6Only"] == ["both"]
    assert s["Install.WantedBy"] == ["sockets.target"]


def test_systemd_analyze_verify_socket_units(checkable_unit: Path) -> None:
    # instances of the templates, beside the service they start (verify loads it from there)
    units = []
    for template in (TCP_SOCKET, MPTCP_SOCKET):
        unit = checkable_unit.parent / template.name.replace("@.", "@edge.")
        unit.write_text(template.read_text())
        units.append(str(unit))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                         cwd=checkable_unit.parent, capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert res.returncode == 0, res.stderr
    problems = res.stderr.strip().splitlines()
    if systemd_version() < 257:
        # SocketProtocol=mptcp came with systemd 257: older ones ignore it (docs/operating.md)
        line = MPTCP_SOCKET.read_text().splitlines().index("SocketProtocol=mptcp") + 1
        ignored = f"{units[1]}:{line}: Failed to parse socket protocol, ignoring: mptcp"
        problems = [p for p in problems if p != ignored]
    assert not problems, res.stderr


def test_an_inherited_blocking_listener_is_made_non_blocking() -> None:
    """systemd may pass a listener in blocking mode; an accept() on it must never stall the
    event loop or a relay worker, whichever loop runs (uvloop happens to change the mode,
    the asyncio fallback does not)."""
    script = textwrap.dedent("""
        import os, socket
        from mptcpproxy import sdlisten
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        if s.fileno() != 3:
            os.dup2(s.fileno(), 3)
        os.set_blocking(3, True)
        [passed] = sdlisten.take_passed({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())})
        print(os.get_blocking(3), passed.sock.getblocking())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
