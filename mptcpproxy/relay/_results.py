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


class PathStat(NamedTuple):
    """One subflow of an MPTCP connection, as last sampled.

    id 0 is not a subflow: it holds the bytes the samples missed on subflows that closed
    between two samples when more than one did ("closed subflows"), and those of subflows
    beyond the MAX_PATHS a connection keeps; its local and remote are ("", 0)."""

    id: int  # the kernel's subflow id (unique per connection, never reused)
    local: tuple  # (host, port)
    remote: tuple  # (host, port)
    bytes_sent: int  # tcpi_bytes_sent
    bytes_received: int  # tcpi_bytes_received
    bytes_retrans: int  # tcpi_bytes_retrans
    rtt_us: int  # tcpi_rtt
    closed: bool  # gone from the kernel's list (removed, or the connection ended)
    # tcpi_bytes_acked: what the peer acknowledged on this subflow (+1 for SYN and FIN).
    # Unlike bytes_sent it does not count a segment twice when the sender's own qdisc
    # dropped it before the wire (tbf, fq_codel): the shares are taken from it.
    bytes_acked: int = 0


# Subflows kept per connection; a new one past that takes the place of a closed one (whose
# counts go to the id-0 entry), or when none is closed, is counted in the id-0 entry.
MAX_PATHS = 9  # the most subflows the kernel opens at once (8 + 1): a live one is never folded


class ConnStat(NamedTuple):
    """One open pair, as its worker last published it (Relay.connections())."""

    conn_id: int
    tag: int  # the listener's tag
    client: tuple | None  # (host, port) of the client (None if unknown)
    upstream: tuple | None  # (host, port) the pair's upstream side is connected to
    age: float  # seconds since the pair started
    bytes_ab: int  # client -> upstream so far
    bytes_ba: int  # upstream -> client so far
    is_mptcp: bool
    subflows: int  # established subflows now
    paths: tuple  # of PathStat ((): not MPTCP, not sampled yet, sampling off, kernel < 6.5)
    mptcp_bytes_sent: int  # connection-level mptcpi_bytes_sent (0 if not MPTCP)
    mptcp_bytes_received: int
    mptcp_bytes_retrans: int
    connecting: bool = False  # accepted by the relay itself, its upstream connect() under way


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
    # of PathStat, the final sample ((): not MPTCP, sampling off, < 6.5); the compiled
    # engine's is a PathList: a sequence equal to the tuple, and .text (the end line's)
    paths: tuple = ()
    mptcp_bytes_sent: int = 0  # connection-level mptcpi_bytes_* (0 if not MPTCP)
    mptcp_bytes_received: int = 0
    mptcp_bytes_retrans: int = 0


class WorkerStats(NamedTuple):
    active: int  # pairs open now
    pairs: int  # pairs handed to this worker since start
    bytes: int  # bytes relayed by this worker since start
    accepted: int = 0  # connections this worker accepted itself (Relay.listen)
    accept_errors: int = 0  # accept() failures for want of fds or memory
