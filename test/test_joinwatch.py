"""JoinWatch (joinwatch.py): one warning a minute when connections keep ending with one
subflow while the kernel counts refused joins, from fake /proc/net/netstat text."""

from __future__ import annotations

import logging

import pytest

from mptcpproxy.joinwatch import INTERVAL_ENV, JoinWatch, tick_interval
from mptcpproxy.relay._results import Result


def netstat(**counters: int) -> str:
    """/proc/net/netstat as the kernel writes it: TcpExt and MPTcpExt, names then values."""
    names = {"MPCapableSYNRX": 3, "MPJoinNoTokenFound": 0, "MPJoinSynRx": 0,
             "MPJoinSynAckRx": 0, "MPJoinSynTx": 0, **counters}
    return ("TcpExt: SyncookiesSent SyncookiesRecv\nTcpExt: 0 0\n"
            f"MPTcpExt: {' '.join(names)}\nMPTcpExt: {' '.join(map(str, names.values()))}\n")


class Kernel:
    """The counters the fake kernel shows, changed by the test between ticks."""

    def __init__(self, **counters: int) -> None:
        self.counters = counters
        self.fail: OSError | None = None

    def read(self) -> str:
        if self.fail:
            raise self.fail
        return netstat(**self.counters)


def ended(subflows: int, is_mptcp: bool = True) -> Result:
    return Result(1, 100, 200, 1.0, "closed", 0, is_mptcp, subflows if is_mptcp else 0)


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING]


def test_server_sees_joins_for_unknown_connections(caplog: pytest.LogCaptureFixture) -> None:
    kernel = Kernel(MPJoinNoTokenFound=5)  # counted before the proxy started: not ours
    watch = JoinWatch(kernel.read)
    for _ in range(3):
        watch.connection_ended(ended(1), mptcp_leg=True)
    watch.connection_ended(ended(2), mptcp_leg=True)
    kernel.counters["MPJoinNoTokenFound"] = 9
    with caplog.at_level(logging.INFO, "mptcpproxy"):
        text = watch.tick()
    assert [r.getMessage() for r in warnings(caplog)] == [text]
    assert text.startswith("3 of 4 MPTCP connection(s) ended with one subflow since the last "
                           "check while the kernel counted 4 join(s) for connections this "
                           "host does not know (MPJoinNoTokenFound)")
    assert "a load balancer spreading subflows" in text
    assert "ip mptcp endpoint add OWN_ADDR dev DEV signal && sysctl -w " \
        "net.mptcp.allow_join_initial_addr_port=0" in text
    assert text.endswith("see docs/scale-out.md")
    record = warnings(caplog)[0]
    assert (record.event, record.one_subflow, record.join_no_token) == ("joins_refused", 3, 4)
    # the next minute: nothing new, nothing said
    assert watch.tick() is None and len(warnings(caplog)) == 1


def test_client_sees_joins_sent_but_not_answered() -> None:
    kernel = Kernel(MPJoinSynTx=2, MPJoinSynAckRx=2)
    watch = JoinWatch(kernel.read)
    watch.connection_ended(ended(1), mptcp_leg=True)
    kernel.counters.update(MPJoinSynTx=12, MPJoinSynAckRx=3)
    text = watch.tick()
    assert text is not None and text.startswith(
        "1 of 1 MPTCP connection(s) ended with one subflow since the last check while the "
        "kernel counted 9 of 10 join(s) sent refused or unanswered (MPJoinSynTx +10, "
        "MPJoinSynAckRx +1)")


@pytest.mark.parametrize("case", ["no-refused-join", "all-two-subflows", "not-mptcp",
                                  "tcp-leg", "no-connection"])
def test_quiet_when_nothing_points_at_refused_joins(case: str) -> None:
    kernel = Kernel()
    watch = JoinWatch(kernel.read)
    if case != "no-refused-join":
        kernel.counters.update(MPJoinNoTokenFound=3, MPJoinSynTx=4)
    if case == "all-two-subflows":
        watch.connection_ended(ended(2), mptcp_leg=True)
    elif case == "not-mptcp":  # fell back to TCP: no join was possible
        watch.connection_ended(ended(1, is_mptcp=False), mptcp_leg=True)
    elif case == "tcp-leg":
        watch.connection_ended(ended(1), mptcp_leg=False)
    elif case != "no-connection":
        watch.connection_ended(ended(1), mptcp_leg=True)  # joins all answered
        kernel.counters.update(MPJoinSynTx=1, MPJoinSynAckRx=1)
    assert watch.tick() is None


def test_counts_start_again_after_each_tick() -> None:
    kernel = Kernel()
    watch = JoinWatch(kernel.read)
    watch.connection_ended(ended(1), mptcp_leg=True)
    assert watch.tick() is None  # no refused join in that minute
    kernel.counters["MPJoinNoTokenFound"] = 1
    assert watch.tick() is None  # a refused join, but no connection ended with one subflow
    watch.connection_ended(ended(1), mptcp_leg=True)
    kernel.counters["MPJoinNoTokenFound"] = 2
    assert watch.tick().startswith("1 of 1 ")


def test_unreadable_or_older_kernel_never_raises() -> None:
    kernel = Kernel()
    watch = JoinWatch(kernel.read)
    watch.connection_ended(ended(1), mptcp_leg=True)
    kernel.fail = FileNotFoundError(2, "No such file or directory")
    assert watch.tick() is None
    kernel.fail = None
    kernel.counters["MPJoinNoTokenFound"] = 2  # compared with the last good reading
    watch.connection_ended(ended(1), mptcp_leg=True)
    assert "2 join(s) for connections" in watch.tick()
    # a kernel without MPJoinSynTx: only MPJoinNoTokenFound counts
    old = JoinWatch(lambda: "MPTcpExt: MPJoinNoTokenFound MPJoinSynAckRx\nMPTcpExt: 0 0\n")
    old.connection_ended(ended(1), mptcp_leg=True)
    assert old.tick() is None
    assert JoinWatch(lambda: "garbage").tick() is None
    # unreadable at the start: the first good reading is the baseline, not since boot
    kernel = Kernel(MPJoinNoTokenFound=50)
    kernel.fail = PermissionError(13, "Permission denied")
    late = JoinWatch(kernel.read)
    kernel.fail = None
    late.connection_ended(ended(1), mptcp_leg=True)
    assert late.tick() is None
    kernel.counters["MPJoinNoTokenFound"] = 51
    late.connection_ended(ended(1), mptcp_leg=True)
    assert "1 join(s) for connections" in late.tick()


def test_tick_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert tick_interval() == 60.0
    monkeypatch.setenv(INTERVAL_ENV, "2")
    assert tick_interval() == 2.0
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    assert tick_interval() == 60.0
