"""The relay engine: worker threads that pump bytes between pairs of connected sockets.

`mptcpproxy.relay._relay` (Cython, GIL released in the loop) and `mptcpproxy.relay._relay_py`
(pure Python) implement this same API; `mptcpproxy.relay` picks one.
"""

from mptcpproxy.relay._results import Result, WorkerStats

class Relay:
    def __init__(self, workers: int = 1, bufsize: int = 131072, idle_timeout: float = 0.0,
                 splice: bool = False, busy_poll: float = 0.0) -> None:
        """Start `workers` threads. `idle_timeout` > 0 closes pairs idle that long.
        `busy_poll` > 0: a worker polls without sleeping for that many seconds after each
        event (lower latency, a busy CPU while traffic flows).
        `splice`: a direction that reads 64 KiB or more at once moves by splice() through a
        pipe until a turn moves less (bulk never copied to user space)."""
    @property
    def notify_fd(self) -> int:
        """Readable when finished pairs wait in collect(); never read it yourself."""
    @property
    def active(self) -> int:
        """Pairs open now, across all workers."""
    def new_id(self) -> int:
        """A connection id, unique in this process (shared with the pairs listen() makes)."""
    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1) -> None:
        """Hand over two connected sockets; the relay owns and closes both fds from now on
        (and puts them in non-blocking mode).

        `mptcp_fd` is fd_a, fd_b or -1: the leg whose MPTCP status is reported.
        """
    def listen(self, fd: int, family: int, sockaddr: tuple, mptcp: bool, mptcp_side: int = -1,
               mark: int = 0, connect_timeout: float = 10.0) -> None:
        """Let the workers accept on the listening socket `fd` themselves and connect each
        client to `sockaddr` (MPTCP if `mptcp`, with SO_MARK `mark`). `mptcp_side` is 0
        (the client), 1 (the upstream) or -1: the leg whose MPTCP status is reported.
        Clients whose upstream fails end as Result(reason=FAILED, client=(host, port)).
        The caller keeps `fd` open until unlisten() took effect (`listening` is False)."""
    def unlisten(self) -> None:
        """Stop accepting; the workers drop the listener from their epoll sets."""
    @property
    def listening(self) -> bool:
        """Whether any worker still polls the listener."""
    def collect(self) -> list[Result]:
        """Results of the pairs finished since the last call (also drains notify_fd)."""
    def stats(self) -> list[WorkerStats]:
        """One entry per worker."""
    def close(self) -> None:
        """Abort every open pair (reason ABORTED, reported by collect()), stop the workers."""
