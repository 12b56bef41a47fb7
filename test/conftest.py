"""Shared fixtures: the fd-leak check, the relay engines (`c`, `py`) and the rules for
privileged tests (skipped without root, but a failure under CI=true)."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the helper modules beside the tests

from netns import testbed  # noqa: E402, F401  (fixture for the namespace scenarios)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _can_use_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip"):
        return "needs iproute2 ('ip')"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged"):
        why = _can_use_namespaces()
        if why:
            pytest.skip(f"privileged test: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    # In CI (root, full tool set) a skipped privileged test hides a broken environment.
    if IN_CI and report.skipped and item.get_closest_marker("privileged"):
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped under CI=true: {report.longrepr}"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak():
    """Every test gives back the fds it opened (relay threads close theirs a moment later)."""
    before = _open_fds()
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = _open_fds() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    targets = {}
    for fd in leaked:
        try:
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listdir's own fd, or closed meanwhile
    assert not targets, f"fds leaked by the test: {targets}"


@pytest.fixture(params=["c", "py"])
def engine(request):
    """The relay class, once for the compiled engine and once for its pure-Python twin."""
    if request.param == "c":
        from mptcpproxy.relay._relay import Relay  # no fallback here: a missing build fails
    else:
        from mptcpproxy.relay._relay_py import Relay
    return Relay
