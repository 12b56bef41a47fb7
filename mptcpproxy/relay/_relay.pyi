"""The relay engine: worker threads that pump bytes between pairs of connected sockets.

`mptcpproxy.relay._relay` (Cython, GIL released in the loop) and `mptcpproxy.relay._relay_py`
(pure Python) implement this same API; `mptcpproxy.relay` picks one.
"""

from mptcpproxy.relay._results import ConnStat, Result, WorkerStats

class Relay:
    def __init__(self, workers: int = 1, bufsize: int = 131072, idle_timeout: float = 0.0,
                 splice: bool = False, busy_poll: float = 0.0, path_stats: bool = True) -> None:
        """Start `workers` threads. `idle_timeout` > 0 closes pairs idle that long, and
        `splice` makes halves that move bulk splice; both are defaults for pairs and
        listeners that name none. `busy_poll` > 0: a worker polls without sleeping for
        that many seconds after each event (lower latency, a busy CPU while traffic flows).
        A direction splices once a read brings 64 KiB or more, until a turn moves less
        (bulk never copied to user space). `path_stats` (Linux 6.5+): sample every subflow
        of MPTCP pairs (Result.paths, ConnStat.paths, path_totals()); off, only the count."""
    @property
    def notify_fd(self) -> int:
        """Readable when finished pairs wait in collect(); never read it yourself."""
    @property
    def active(self) -> int:
        """Pairs open now, across all workers (never negative)."""
    def new_id(self) -> int:
        """A connection id, unique in this process (shared with the pairs listen() makes)."""
    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1, *, tag: int = 0,
            idle_timeout: float | None = None, splice: bool | None = None) -> None:
        """Hand over two connected sockets; the relay owns and closes both fds from this
        call on, also when it raises. With splicing on they are put in non-blocking mode.

        `mptcp_fd` is fd_a, fd_b or -1: the leg whose MPTCP status is reported. `tag`
        (0-1023) comes back in the Result and counts the pair in open_pairs(tag).
        """
    def listen(self, fd: int, family: int, sockaddr: tuple, mptcp: bool, mptcp_side: int = -1,
               mark: int = 0, connect_timeout: float = 10.0, *, tag: int = 0,
               idle_timeout: float | None = None, splice: bool | None = None) -> None:
        """Let the workers accept on the listening socket `fd` themselves (it is made
        non-blocking) and connect each client to `sockaddr` (MPTCP if `mptcp`, with SO_MARK
        `mark`). `mptcp_side` is 0 (the client), 1 (the upstream) or -1: the leg whose
        MPTCP status is reported. Any number of listeners (up to 128) can be served at once;
        calling it again for the same fd replaces its settings for new clients.
        Clients whose upstream fails end as Result(reason=FAILED, client=(host, port)).
        The caller keeps `fd` open until the workers let go of it (`holds(fd)` is False)."""
    def unlisten(self, fd: int | None = None) -> None:
        """Stop accepting on `fd` (None: on every listener); the workers drop it from their
        epoll sets. Pairs it made stay open."""
    def holds(self, fd: int) -> bool:
        """Whether any worker has not let go of the listener `fd` yet."""
    @property
    def listening(self) -> bool:
        """Whether any worker still holds any listener."""
    def accepted(self, tag: int) -> int:
        """Clients the workers accepted themselves (Relay.listen) for listeners of this tag."""
    def open_pairs(self, tag: int) -> int:
        """Pairs open now that were added or accepted with this tag."""
    def collect(self) -> list[Result]:
        """Results of the pairs finished since the last call (also drains notify_fd)."""
    def stats(self) -> list[WorkerStats]:
        """One entry per worker."""
    def connections(self) -> list[ConnStat]:
        """The open pairs as the workers last published them (every second, and once a
        worker's last pair ended): cheap, never waits for a busy pair; ages are current."""
    def path_totals(self) -> tuple[dict[str | None, list], int]:
        """Path bytes since start per local address (None: past the 64 a worker counts):
        [sent, received, retransmitted, RTT counts per bucket (13: _relay_py_paths.
        RTT_BOUNDS_US and above), RTT sum in seconds]; and the MPTCP reinjected bytes."""
    def close(self) -> None:
        """Abort every open pair (reason ABORTED; a pair still connecting: FAILED with
        ECANCELED), let go of every listener, stop the workers. Results stay for collect()."""
