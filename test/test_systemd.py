"""systemd: the sd_notify helper against a unix datagram socket we bind, and the template
unit checked by `systemd-analyze verify` and `systemd-analyze security --offline`."""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from mptcpproxy.sdnotify import sd_notify

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "mptcp-proxy@.service"
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

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_unit_says_what_the_daemon_needs() -> None:
    s = unit_settings()
    assert s["Service.Type"] == ["notify"]
    assert s["Service.EnvironmentFile"] == ["/etc/mptcp-proxy/%i.conf"]
    assert s["Service.ExecStart"] == ["mptcp-proxy $ARGS"]  # $ARGS split into words
    assert s["Service.ExecReload"] == ["kill -HUP $MAINPID"]  # reopens --log-file
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
    text = re.sub(r"^(ExecStart(?:Pre)?=-?)mptcp-proxy ", rf"\g<1>{stub} ",
                  UNIT.read_text(), flags=re.M)
    unit = tmp_path / UNIT.name
    unit.write_text(text)
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


def test_example_config_words_are_options() -> None:
    """The example ARGS= line in the unit's header uses the flags the CLI documents."""
    line = next(li for li in UNIT.read_text().splitlines() if "ARGS=" in li)
    flags = set(re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", line.split("ARGS=", 1)[1]))
    from mptcpproxy.cli import build_parser

    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    missing = flags - known
    assert not missing, f"unknown flags in the example: {missing}"
