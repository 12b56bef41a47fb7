"""The relay engine: worker threads that pump bytes between pairs of connected sockets.

`mptcpproxy._relay` (Cython, GIL released in the loop) and `mptcpproxy._relay_py`
(pure Python) implement this same API; `mptcpproxy.relay` picks one.
"""

from typing import NamedTuple

# How a pair ended (Result.reason).
CLOSED: str  # both halves finished with EOF: a clean close
RESET: str  # a peer reset the connection; the reset was passed on to the other peer
TIMEOUT: str  # no byte moved either way for idle_timeout seconds
ERROR: str  # another socket error (Result.errno says which)
ABORTED: str  # the relay was closed while the pair was open

class Result(NamedTuple):
    """What one finished pair reports."""

    conn_id: int
    bytes_ab: int  # bytes delivered from fd_a to fd_b
    bytes_ba: int  # bytes delivered from fd_b to fd_a
    duration: float  # seconds between add() and the close
    reason: str
    errno: int  # 0 unless reason is RESET or ERROR
    is_mptcp: bool  # the watched fd (mptcp_fd) really ran MPTCP (TCP_IS_MPTCP)
    subflows: int  # most subflows seen on it, the first included (0 when not MPTCP)

class WorkerStats(NamedTuple):
    active: int  # pairs open now
    pairs: int  # pairs handed to this worker since start
    bytes: int  # bytes relayed by this worker since start

class Relay:
    def __init__(self, workers: int = 1, bufsize: int = 131072, idle_timeout: float = 0.0) -> None:
        """Start `workers` threads. `idle_timeout` > 0 closes pairs idle that long."""
    @property
    def notify_fd(self) -> int:
        """Readable when finished pairs wait in collect(); never read it yourself."""
    @property
    def active(self) -> int:
        """Pairs open now, across all workers."""
    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1) -> None:
        """Hand over two connected sockets; the relay owns and closes both fds from now on.

        `mptcp_fd` is fd_a, fd_b or -1: the leg whose MPTCP status is reported.
        """
    def collect(self) -> list[Result]:
        """Results of the pairs finished since the last call (also drains notify_fd)."""
    def stats(self) -> list[WorkerStats]:
        """One entry per worker."""
    def close(self) -> None:
        """Abort every open pair (reason ABORTED, reported by collect()), stop the workers."""
