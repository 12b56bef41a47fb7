"""What the relay reports, shared by the compiled relay and its pure-Python twin."""

from __future__ import annotations

from typing import NamedTuple

# How a pair ended (Result.reason); the index is the code the relay engines use.
CLOSED = "closed"  # both halves finished with EOF: a clean close
RESET = "reset"  # a peer reset the connection; the reset was passed on to the other peer
TIMEOUT = "timeout"  # no byte moved either way for idle_timeout seconds
ERROR = "error"  # another socket error (Result.errno says which)
ABORTED = "aborted"  # the relay was closed while the pair was open
FAILED = "failed"  # Relay.listen: the upstream could not be reached (errno says why)
ACCEPT_ERROR = "accept_error"  # Relay.listen: not a pair, accept() failed (errno)
REASONS = (CLOSED, RESET, TIMEOUT, ERROR, ABORTED, FAILED, ACCEPT_ERROR)

# The longest time either engine takes (idle_timeout, connect_timeout, busy_poll): the
# compiled one holds times as int64 nanoseconds.
MAX_SECONDS = 1e9


class Result(NamedTuple):
    """What one finished pair reports."""

    conn_id: int
    bytes_ab: int  # bytes delivered from fd_a to fd_b
    bytes_ba: int  # bytes delivered from fd_b to fd_a
    duration: float  # seconds between add() and the close
    reason: str
    errno: int  # why: set for RESET, ERROR, FAILED and ACCEPT_ERROR, else 0
    is_mptcp: bool  # the watched fd (mptcp_fd) really ran MPTCP (TCP_IS_MPTCP)
    subflows: int  # most subflows seen on it, the first included (0 when not MPTCP)
    client: tuple | None = None  # (host, port) of a client the relay accepted itself
    tag: int = 0  # the listener's tag given to Relay.listen or Relay.add


class WorkerStats(NamedTuple):
    active: int  # pairs open now
    pairs: int  # pairs handed to this worker since start
    bytes: int  # bytes relayed by this worker since start
    accepted: int = 0  # connections this worker accepted itself (Relay.listen)
    accept_errors: int = 0  # accept() failures for want of fds or memory
