# The Python side of the io_uring engine: a worker thread each, their records, the probe.
# Included by mptcpproxy/_uring.pyx.

REASONS = ("closed", "failed", "error", "stopped")


def _sockaddr(host: str, port: int) -> tuple[int, bytes]:
    """The upstream address as the kernel takes it (struct sockaddr_in or sockaddr_in6)."""
    if ":" in host:
        return socket.AF_INET6, struct.pack("=H", socket.AF_INET6) + struct.pack(
            "!HI16sI", port, 0, socket.inet_pton(socket.AF_INET6, host), 0)
    return socket.AF_INET, struct.pack("=H", socket.AF_INET) + struct.pack(
        "!H4s8x", port, socket.inet_aton(host))


cdef class _Worker:
    cdef Worker *w

    def __cinit__(self, int lfd, int family, bytes addr, int proto, tuple pools,
                  bint multishot_accept):
        self.w = <Worker *>calloc(1, sizeof(Worker))
        if self.w == NULL:
            raise MemoryError()
        self.w.ring = self.w.efd = -1
        c.pthread_mutex_init(&self.w.lock, NULL)
        self.w.records = <Record *>calloc(RESULTS_MAX, sizeof(Record))
        if self.w.records == NULL:
            raise MemoryError()
        self.w.lfd, self.w.family, self.w.proto = lfd, family, proto
        self.w.multishot_accept = multishot_accept
        for i, (count, size) in enumerate(pools):
            self.w.pool[i].count, self.w.pool[i].size = count, size
        memcpy(self.w.upstream.raw, <char *>addr, len(addr))
        self.w.upstream_len = len(addr)
        self.w.efd = c.eventfd(0, c.EFD_CLOEXEC)
        if self.w.efd < 0:
            raise OSError(c.errno, os.strerror(c.errno))

    def __dealloc__(self):
        if self.w != NULL:
            if self.w.efd >= 0:
                c.close(self.w.efd)
            c.pthread_mutex_destroy(&self.w.lock)
            free(self.w.records)
            free(self.w)

    def run(self):
        """The worker's loop, in the calling thread, until stop(): creates the ring here
        (it is single-issuer), relays, cancels and closes everything at the end."""
        cdef int ret
        with nogil:
            ret = ring_open(self.w)
            if ret == 0:
                ret = loop(self.w)
            ring_close(self.w)
        if ret < 0:
            raise OSError(-ret, f"io_uring: {os.strerror(-ret)}")

    def stop(self):
        cdef uint64_t one = 1
        c.write(self.w.efd, &one, 8)

    def close(self):
        """Closes its eventfd (after run() returned)."""
        if self.w.efd >= 0:
            c.close(self.w.efd)
            self.w.efd = -1

    def drain(self):
        """The pairs finished since the last call: (bytes up, bytes down, reason, errno)."""
        cdef uint32_t i
        out = []
        c.pthread_mutex_lock(&self.w.lock)
        for i in range(self.w.nrecords):
            r = self.w.records[i]
            out.append((r.up, r.down, REASONS[r.reason], r.err))
        self.w.nrecords = 0
        c.pthread_mutex_unlock(&self.w.lock)
        return out

    @property
    def counters(self):
        return (self.w.accepted, self.w.finished, self.w.enters, self.w.dropped,
                self.w.starved)


class Uring:
    """The experimental io_uring relay: `workers` threads relay the connections accepted on
    `listener` (a listening socket, not owned) to `upstream` (host, port); MPTCP upstream
    sockets with mptcp=True. start(), then stop() (cancels and closes every pair)."""

    def __init__(self, listener, upstream, *, mptcp=False, workers=0,
                 small=(256, 16 << 10), big=(8, 512 << 10), multishot_accept=False):
        for what, (count, size) in (("small", small), ("big", big)):
            if count & (count - 1) or not 0 <= count <= 32768 or size <= 0:
                raise ValueError(f"{what}: (count, size) with count a power of two up to "
                                 "32768 (0: no big buffers)")
        if not small[0]:
            raise ValueError("small: at least one buffer")
        family, addr = _sockaddr(*upstream)
        proto = IPPROTO_MPTCP if mptcp else socket.IPPROTO_TCP
        n = workers or len(os.sched_getaffinity(0))
        self._workers = [_Worker(listener.fileno(), family, addr, proto, (small, big),
                                 multishot_accept)
                         for _ in range(n)]
        self._threads = []
        self._errors = []
        self.results = []

    def _run(self, worker):
        try:
            worker.run()
        except OSError as exc:
            self._errors.append(exc)

    def start(self):
        for i, worker in enumerate(self._workers):
            t = threading.Thread(target=self._run, args=(worker,), name=f"uring-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def collect(self):
        """Move the finished pairs' records into self.results; returns the new ones."""
        new = [r for worker in self._workers for r in worker.drain()]
        self.results.extend(new)
        return new

    def stop(self, timeout=10.0):
        for worker in self._workers:
            worker.stop()
        for t, worker in zip(self._threads, self._workers):
            t.join(timeout)
            if not t.is_alive():
                worker.close()
        self.collect()
        if self._errors:
            raise self._errors[0]

    @property
    def counters(self):
        """(accepted, finished, io_uring_enter calls, records dropped, recvs that found no
        free buffer), summed over the workers."""
        return tuple(sum(x) for x in zip(*(w.counters for w in self._workers)))


def probe():
    """None when this kernel lets us set up a ring like the workers' (with a provided
    buffer ring), else why not (a sentence)."""
    cdef Worker w
    cdef int ret
    memset(&w, 0, sizeof(w))
    w.ring = -1
    w.pool[SMALL].count, w.pool[SMALL].size = 2, 4096
    ret = ring_open(&w)
    ring_close(&w)
    if ret < 0:
        return f"the kernel refuses io_uring here: {os.strerror(-ret)}"
    return None

