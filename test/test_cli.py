"""The command line as a person meets it: each bad input gives its exit code and one line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mptcpproxy import __version__
from mptcpproxy.cli import build_parser


def proxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mptcpproxy", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mptcp-proxy: error: ")
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["-p", "5555", "-r", "127.0.0.1:4444"], ["-m/--mode"]),
        (["-m", "relay", "-p", "5555", "-r", "127.0.0.1:4444"], ["relay", "client", "server"]),
        (["-m", "client", "-p", "0", "-r", "127.0.0.1:4444"], ["port 0", "1-65535"]),
        (["-m", "client", "-p", "70000", "-r", "127.0.0.1:4444"], ["70000", "1-65535"]),
        (["-m", "client", "-p", "http", "-r", "127.0.0.1:4444"], ["'http'", "port"]),
        (["-m", "client", "-p", "5555", "-r", "10.0.1.2"], ["10.0.1.2", "HOST:PORT"]),
        (["-m", "client", "-p", "5555", "-r", "2001:db8::2:4444"], ["brackets"]),
        (["-m", "client", "-p", "5555", "-r", "[2001:db8::2]"], ["port"]),
        (["-m", "client", "-p", "5555", "-r", "h:1", "--workers", "0"], ["--workers"]),
        (["-m", "client", "-p", "5555", "-r", "h:1", "--buffer-size", "0"], ["--buffer-size"]),
        (["-m", "client", "-p", "5555", "-r", "h:1", "--connect-timeout", "-1"], ["timeout"]),
        (["-m", "client", "-p", "5555", "-r", "h:1", "--busy-poll", "-5"],
         ["--busy-poll", "-5", "at least 0"]),
        (["-m", "client", "-p", "5555", "-r", "h:1", "-v", "-q"], ["-q", "-v"]),
        # an empty host is not "every address": the metrics have no authentication, so
        # listening everywhere must be written out ([::]:9541)
        (["-m", "client", "-p", "5555", "-r", "h:1", "--metrics", ":9541"],
         ["--metrics", "':9541' has no host", "127.0.0.1:9541"]),
        (["-m", "client", "-p", "5555", "-r", ":4444"], ["':4444' has no host"]),
    ],
    ids=["no-mode", "bad-mode", "port-0", "port-70000", "port-name", "no-port",
         "v6-no-brackets", "v6-no-port", "workers-0", "buffer-0", "negative-timeout",
         "busy-poll-negative", "verbose-quiet", "metrics-no-host", "remote-no-host"],
)
def test_usage_errors_exit_2_with_one_line(args, words):
    assert_one_line_error(proxy(*args), 2, *words)


def test_unresolvable_host_is_a_startup_failure():
    proc = proxy("-m", "client", "-p", "0", "-r", "no-such-host.invalid:4444")
    # -p 0 is refused first; use a free port instead to reach the resolver.
    assert proc.returncode == 2
    port = free_port()
    proc = proxy("-m", "client", "-p", str(port), "-r", "no-such-host.invalid:4444")
    assert_one_line_error(proc, 1, "cannot resolve", "no-such-host.invalid")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_a_startup_failure():
    with socket.socket(socket.AF_INET6) as busy:
        busy.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        busy.bind(("::", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = proxy("-m", "client", "-p", str(port), "-r", "127.0.0.1:4444")
    assert_one_line_error(proc, 1, f"port {port}", "already in use")


def test_version_matches_package():
    proc = proxy("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"mptcp-proxy {__version__}"


def test_help_lists_the_modes():
    proc = proxy("--help")
    assert proc.returncode == 0
    for word in ("--mode", "--port", "--remote", "--disable-mptcp", "--bind", "--workers",
                 "--connect-timeout"):
        assert word in proc.stdout


def test_parse_remote_forms():
    parser = build_parser()
    for text, host in (("10.0.1.2:4444", "10.0.1.2"), ("[2001:db8::2]:4444", "2001:db8::2"),
                       ("localhost:5201", "localhost")):
        args = parser.parse_args(["-m", "client", "-p", "5555", "-r", text])
        assert (args.remote.host, args.remote.port) == (host, int(text.rsplit(":", 1)[1]))
        assert str(args.remote) == text


@pytest.mark.privileged
def test_mptcp_disabled_in_kernel_names_the_fix(testbed):
    host = testbed.host("nomptcp")
    host.sysctl("net.mptcp.enabled", 0)
    proc = host.run(
        [sys.executable, "-m", "mptcpproxy", "-m", "client", "-p", "5555", "-r", "127.0.0.1:1"],
        check=False, timeout=30,
    )
    assert_one_line_error(proc, 1, "net.mptcp.enabled=1", "--disable-mptcp")
    # With --disable-mptcp the same kernel is fine: the proxy starts (and stops on SIGTERM).
    proc = host.run(
        ["timeout", "--preserve-status", "-s", "TERM", "2", sys.executable, "-m", "mptcpproxy",
         "-m", "client", "-p", "5555", "-r", "127.0.0.1:1", "--disable-mptcp"],
        check=False, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
