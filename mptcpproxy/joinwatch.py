"""Refused joins: MPTCP connections that keep one subflow because their joins go elsewhere.

Behind a load balancer that spreads new 5-tuples over several servers, a join sent to the
shared address lands on another server, which resets it: connections end `subflows=1`, the
server that got the join counts `MPJoinNoTokenFound`, and the client counts a join sent
(`MPJoinSynTx`) that no SYN-ACK answered (`MPJoinSynAckRx`). `JoinWatch` compares the
connections that ended against these counters of its own network namespace
(/proc/net/netstat) and says so once a minute at most; `check.py` says the same on
`--check`. The remedy is in docs/scale-out.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mptcpproxy.kernelstate import NETSTAT, parse_netstat

if TYPE_CHECKING:  # check.py imports this module: it must not load the relay engine
    from mptcpproxy.relay._results import Result

log = logging.getLogger("mptcpproxy")

SCALE_OUT_DOC = "docs/scale-out.md"
REMEDY = ("on every server behind the load balancer, announce its own address and keep "
          "clients from joining the shared one: ip mptcp endpoint add OWN_ADDR dev DEV signal "
          "&& sysctl -w net.mptcp.allow_join_initial_addr_port=0")
INTERVAL = 60.0  # seconds between two ticks: one warning a minute at most
INTERVAL_ENV = "MPTCPPROXY_JOINWATCH_INTERVAL"  # a shorter one, for tests


def tick_interval() -> float:
    """Seconds between two `JoinWatch.tick()` calls: a minute, or $MPTCPPROXY_JOINWATCH_INTERVAL
    (for tests, which cannot wait a minute)."""
    try:
        return max(0.1, float(os.environ.get(INTERVAL_ENV, INTERVAL)))
    except ValueError:
        return INTERVAL


def unanswered_joins(counters: Mapping[str, int]) -> int | None:
    """Joins sent that no SYN-ACK answered (refused, or lost on the way); None when this
    kernel does not count joins sent (MPJoinSynTx is newer than MPJoinSynAckRx)."""
    if "MPJoinSynTx" not in counters or "MPJoinSynAckRx" not in counters:
        return None
    return max(0, counters["MPJoinSynTx"] - counters["MPJoinSynAckRx"])


def _read_netstat(path: Path | str = NETSTAT) -> str:
    with open(path) as f:
        return f.read()


class JoinWatch:
    """Counts the MPTCP connections that ended with one subflow (`connection_ended`) and,
    at each `tick()` (once a minute), logs one warning when some did while the kernel
    counted refused or unanswered joins since the last tick.

    `read` returns the text of /proc/net/netstat (of this process's network namespace
    unless given). A counter the kernel lacks counts as zero; an unreadable file, as no
    refused join: the watch never raises.
    """

    def __init__(self, read: Callable[[], str] = _read_netstat) -> None:
        self._read = read
        self.ended = 0  # MPTCP connections ended since the last tick
        self.single = 0  # ... of which with one subflow
        self._last = self._counters()

    def _counters(self) -> dict[str, int]:
        try:
            return parse_netstat(self._read())
        except (OSError, ValueError) as exc:
            log.debug("cannot read the MPTCP counters: %s", exc)
            return {}

    def connection_ended(self, result: Result, mptcp_leg: bool) -> None:
        """Count a pair that ended; only an MPTCP leg that really ran MPTCP matters."""
        if not mptcp_leg or not result.is_mptcp:
            return
        self.ended += 1
        if result.subflows == 1:
            self.single += 1

    def tick(self) -> str | None:
        """Compare with the counters at the last tick; log (and return) the warning if due."""
        now = self._counters()
        if not now:  # unreadable: keep the last reading to compare with next time
            self.ended = self.single = 0
            return None
        last, self._last = self._last, now
        if not last:  # the first good reading: counts since boot say nothing about us
            self.ended = self.single = 0
            return None

        def rise(name: str) -> int:
            return max(0, now.get(name, 0) - last.get(name, 0))

        no_token = rise("MPJoinNoTokenFound")
        sent, answered = rise("MPJoinSynTx"), rise("MPJoinSynAckRx")
        unanswered = max(0, sent - answered)
        ended, single = self.ended, self.single
        self.ended = self.single = 0
        if not single or not (no_token or unanswered):
            return None
        seen = []
        if no_token:
            seen.append(f"{no_token} join(s) for connections this host does not know "
                        "(MPJoinNoTokenFound)")
        if unanswered:
            seen.append(f"{unanswered} of {sent} join(s) sent refused or unanswered "
                        f"(MPJoinSynTx +{sent}, MPJoinSynAckRx +{answered})")
        text = (f"{single} of {ended} MPTCP connection(s) ended with one subflow since the last "
                f"check while the kernel counted {' and '.join(seen)}: are joins reaching "
                "another server than their connection's (a load balancer spreading subflows)? "
                f"Fix: {REMEDY}; see {SCALE_OUT_DOC}")
        log.warning("%s", text, extra={
            "event": "joins_refused", "connections": ended, "one_subflow": single,
            "join_no_token": no_token, "joins_sent": sent, "joins_answered": answered})
        return text
