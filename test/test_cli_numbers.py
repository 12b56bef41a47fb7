"""Numbers the parser must refuse because the proxy could not hold them: each one is a
usage error (exit 2, one line naming the option and the limit), never a traceback, a
proxy that starts and misbehaves, or a start-up that takes the machine's memory."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_cli import assert_one_line_error, free_port, proxy

from mptcpproxy.cli import build_parser

HUGE = "99999999999999999999"

CASES = [
    # (option, value, words the message must hold)
    ("--connect-timeout", "inf", ["--connect-timeout", "inf"]),
    ("--connect-timeout", "-inf", ["--connect-timeout"]),
    ("--connect-timeout", "nan", ["--connect-timeout", "nan"]),
    ("--connect-timeout", "1e10", ["--connect-timeout", "604800"]),
    ("--connect-timeout", "1e400", ["--connect-timeout"]),
    ("--connect-timeout", "0", ["--connect-timeout", "more than 0"]),
    ("--connect-timeout", "1e-12", ["--connect-timeout", "0.001"]),
    ("--idle-timeout", "inf", ["--idle-timeout"]),
    ("--idle-timeout", "nan", ["--idle-timeout"]),
    ("--idle-timeout", "1e10", ["--idle-timeout", "604800"]),
    ("--drain-timeout", "inf", ["--drain-timeout"]),
    ("--drain-timeout", "nan", ["--drain-timeout"]),
    ("--drain-timeout", "1e10", ["--drain-timeout", "604800"]),
    ("--workers", "100000", ["--workers", "256"]),
    ("--workers", HUGE, ["--workers", "256"]),
    ("--workers", "1e3", ["--workers", "whole number"]),
    ("--buffer-size", HUGE, ["--buffer-size", "65536"]),
    ("--buffer-size", "100000000", ["--buffer-size", "65536"]),
    ("--buffer-size", "2", ["--buffer-size", "at least 4 KiB"]),
    ("--buffer-size", "inf", ["--buffer-size", "whole number"]),
    ("--busy-poll", HUGE, ["--busy-poll", "1000000"]),
    ("--busy-poll", "nan", ["--busy-poll", "whole number"]),
    ("--max-connections", HUGE, ["--max-connections", "1000000000"]),
    ("--max-connections", "inf", ["--max-connections", "whole number"]),
    ("--mark", "0x100000000", ["mark", "0xffffffff"]),
    ("--mark", "inf", ["mark", "inf"]),
]


@pytest.mark.parametrize(("option", "value", "words"), CASES,
                         ids=[f"{o[2:]}={v[:12]}" for o, v, _ in CASES])
def test_out_of_range_numbers_are_usage_errors(option, value, words):
    # a port that is free, an upstream that refuses: if the value got through, the proxy
    # would start (and the test fail on its timeout) instead of refusing it
    args = ["-m", "client", "-p", str(free_port()), "-b", "127.0.0.1", "-r", "127.0.0.1:1",
            "--disable-mptcp", option, value]
    try:
        proc = proxy(*args, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{option} {value} was accepted: the proxy started")
    assert_one_line_error(proc, 2, *words)


@pytest.mark.parametrize("args", [
    ["--connect-timeout", "604800"], ["--connect-timeout", "0.001"], ["--idle-timeout", "0.5"],
    ["--drain-timeout", "604800"], ["--workers", "256"], ["--buffer-size", "4"],
    ["--buffer-size", "65536"], ["--busy-poll", "1000000"], ["--busy-poll", "0"],
    ["--max-connections", "1000000000"], ["--mark", "0xffffffff"],
], ids=lambda a: f"{a[0][2:]}={a[1]}")
def test_the_limits_themselves_are_accepted(args):
    parsed = build_parser().parse_args(["-m", "client", "-p", "1", "-r", "h:1", *args])
    assert parsed is not None


def test_help_states_the_limits():
    out = proxy("--help").stdout
    for limit in ("604800", "256", "4-65536", "1000000"):
        assert limit in out, limit


def test_unresolvable_metrics_host_says_so():
    proc = proxy("-m", "client", "-p", str(free_port()), "-b", "127.0.0.1", "-r",
                 "127.0.0.1:1", "--disable-mptcp", "--metrics", "nonexistent.invalid:9541")
    assert_one_line_error(proc, 1, "nonexistent.invalid", "cannot resolve")
    assert "unknown error" not in proc.stderr


def test_relay_that_cannot_get_its_memory_is_one_line():
    """Within the bounds, but more than this process may have: 64 workers of 64 MiB buffers
    under a 2 GB address-space limit."""
    proc = subprocess.run(
        ["prlimit", "--as=2000000000", sys.executable, "-m", "mptcpproxy", "-m", "client",
         "-p", str(free_port()), "-b", "127.0.0.1", "-r", "127.0.0.1:1", "--disable-mptcp",
         "--workers", "64", "--buffer-size", "65536"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert_one_line_error(proc, 1, "64 relay workers", "--workers", "--buffer-size")
