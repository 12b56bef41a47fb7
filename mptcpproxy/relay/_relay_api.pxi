# Included by _relay.pyx: the Python-facing classes. They hold the GIL; the engine
# above them in _relay.pyx never does.

@cython.final
cdef class _Worker:
    cdef WorkerState w
    cdef object thread

    def __cinit__(self):
        cdef int i
        self.w.epfd = -1
        self.w.wakefd = -1
        for i in range(MAX_LISTENERS):
            self.w.listeners[i].fd = -1

    def __init__(self, size_t bufsize, int notifyfd, double busy_poll, bint path_stats):
        cdef c.epoll_event ev
        self.w.notifyfd = notifyfd
        self.w.path_stats = path_stats
        self.w.busy_ns = <int64_t>(busy_poll * NS)
        self.w.bufsize = bufsize
        c.pthread_mutex_init(&self.w.lock, NULL)
        c.pthread_mutex_init(&self.w.out_lock, NULL)
        c.pthread_mutex_init(&self.w.pub_lock, NULL)
        self.w.epfd = c.epoll_create1(c.EPOLL_CLOEXEC)
        if self.w.epfd < 0:
            raise OSError(c.errno, os.strerror(c.errno))
        self.w.wakefd = c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC)
        if self.w.wakefd < 0:
            raise OSError(c.errno, os.strerror(c.errno))
        ev.events = c.EPOLLIN
        ev.data.ptr = NULL
        if c.epoll_ctl(self.w.epfd, c.EPOLL_CTL_ADD, self.w.wakefd, &ev) != 0:
            raise OSError(c.errno, os.strerror(c.errno))
        self.w.scratch = <char *>malloc(bufsize)
        self.w.pool = <char **>calloc(POOL_KEEP, sizeof(char *))
        self.w.done_cap = self.w.spare_cap = 64
        self.w.done = <Done *>malloc(self.w.done_cap * sizeof(Done))
        self.w.spare = <Done *>malloc(self.w.spare_cap * sizeof(Done))
        self.w.open_by_tag = <int64_t *>calloc(MAX_TAGS, sizeof(int64_t))
        self.w.accepted_by_tag = <int64_t *>calloc(MAX_TAGS, sizeof(int64_t))
        if (self.w.scratch == NULL or self.w.pool == NULL or self.w.done == NULL
                or self.w.spare == NULL or self.w.open_by_tag == NULL
                or self.w.accepted_by_tag == NULL):
            raise MemoryError()
        self.thread = threading.Thread(target=self._run, name="mptcpproxy-relay", daemon=True)
        self.thread.start()

    def __reduce__(self):
        raise TypeError("a relay worker holds fds and cannot be pickled")

    def _run(self):
        cdef int rc
        with nogil:
            rc = worker_loop(&self.w)
        if rc < 0:
            raise OSError(self.w.fatal_errno, os.strerror(self.w.fatal_errno))

    cdef void take(self, list out):
        # Swap the outbox with the empty spare under the lock, then build the Results
        # from the taken one while the worker goes on filling the other.
        cdef Done *taken
        cdef int n, cap, i
        cdef Done *d
        cdef PathSet *ps
        cdef PathSet *back = NULL  # copied into their PathList: spares for the worker
        cdef PathSet *back_last = NULL
        c.pthread_mutex_lock(&self.w.out_lock)
        taken, n, cap = self.w.done, self.w.ndone, self.w.done_cap
        self.w.done, self.w.ndone, self.w.done_cap = self.w.spare, 0, self.w.spare_cap
        c.pthread_mutex_unlock(&self.w.out_lock)
        for i in range(n):
            d = &taken[i]
            client = None
            if d.client_family == c.AF_INET:
                client = (socket.inet_ntop(socket.AF_INET, d.client_addr[:4]), d.client_port)
            elif d.client_family == c.AF_INET6:
                client = (socket.inet_ntop(socket.AF_INET6, d.client_addr[:16]), d.client_port)
            ps = d.ps
            d.ps = NULL
            totals = (0, 0, 0)
            if ps != NULL:
                totals = (ps.mptcp_sent, ps.mptcp_received, ps.mptcp_retrans)
            # tuple.__new__: not the namedtuple's Python-level __new__ (one per connection)
            paths = paths_of(ps)
            if ps != NULL and ps.cap == SMALL_PATHS:
                ps.next_free = back
                back = ps
                if back_last == NULL:
                    back_last = ps
            else:
                free(ps)
            out.append(_new_tuple(Result, (
                d.conn_id, d.bytes_ab, d.bytes_ba, d.duration_ns / 1e9,
                REASONS[d.reason], d.err, bool(d.is_mptcp), d.subflows, client, d.tag,
                paths, *totals,
            )))
        self.w.spare, self.w.spare_cap = taken, cap
        if back != NULL:
            c.pthread_mutex_lock(&self.w.out_lock)
            back_last.next_free = self.w.ps_returned
            self.w.ps_returned = back
            c.pthread_mutex_unlock(&self.w.out_lock)

    cdef void connections(self, list out, int64_t now):
        # Copy what the worker last published under pub_lock, then build the ConnStats.
        cdef PubBuf b
        cdef ConnPub *cp
        cdef int i
        memset(&b, 0, sizeof(b))
        c.pthread_mutex_lock(&self.w.pub_lock)
        b.nconns, b.npaths = self.w.pub.nconns, self.w.pub.npaths
        b.conns = <ConnPub *>malloc(b.nconns * sizeof(ConnPub) + 1)
        b.paths = <PathRec *>malloc(b.npaths * sizeof(PathRec) + 1)
        if b.conns != NULL and b.paths != NULL:
            memcpy(b.conns, self.w.pub.conns, b.nconns * sizeof(ConnPub))
            memcpy(b.paths, self.w.pub.paths, b.npaths * sizeof(PathRec))
        c.pthread_mutex_unlock(&self.w.pub_lock)
        try:
            if b.conns == NULL or b.paths == NULL:
                raise MemoryError()
            for i in range(b.nconns):
                cp = &b.conns[i]
                out.append(ConnStat(
                    cp.conn_id, cp.tag, py_addr(&cp.client), py_addr(&cp.upstream),
                    max(now - cp.start_ns, 0) / 1e9, cp.bytes_ab, cp.bytes_ba,
                    bool(cp.is_mptcp), cp.subflows, py_paths(&b.paths[cp.first_path], cp.npaths),
                    cp.mptcp_sent, cp.mptcp_received, cp.mptcp_retrans, bool(cp.connecting),
                ))
        finally:
            free(b.conns)
            free(b.paths)

    cdef uint64_t path_totals(self, dict out):
        # Per local address (None: "other"): [sent, received, retrans, RTT bucket counts...,
        # RTT sum in s], added to what `out` holds; returns the reinjected bytes.
        cdef int i, k
        cdef AddrStat *a
        c.pthread_mutex_lock(&self.w.pub_lock)
        try:
            for i in list(range(self.w.naddrs)) + [MAX_ADDRS]:
                a = &self.w.addrs[i]
                if i == MAX_ADDRS and a.sent == 0 and a.received == 0 and a.retrans == 0:
                    continue  # nothing past MAX_ADDRS addresses
                key = py_addr(&a.local)
                key = key[0] if key else None
                row = out.setdefault(key, [0] * (5 + RTT_BOUNDS))
                row[0] += a.sent
                row[1] += a.received
                row[2] += a.retrans
                for k in range(RTT_BOUNDS + 1):
                    row[3 + k] += a.rtt_count[k]
                row[4 + RTT_BOUNDS] += a.rtt_sum_us / 1e6
            return self.w.reinjected
        finally:
            c.pthread_mutex_unlock(&self.w.pub_lock)

    cdef void push(self, Pair *p) noexcept:
        cdef uint64_t one = 1
        c.pthread_mutex_lock(&self.w.lock)
        p.next = self.w.incoming
        self.w.incoming = p
        c.__atomic_fetch_add(&self.w.total, 1, c.__ATOMIC_RELEASE)
        c.pthread_mutex_unlock(&self.w.lock)
        count_open(&self.w, p.tag, 1)
        c.write(self.w.wakefd, &one, sizeof(one))

    cdef void signal_stop(self) noexcept:
        cdef uint64_t one = 1
        self.w.stopping = 1
        c.write(self.w.wakefd, &one, sizeof(one))

    def stop(self):
        self.signal_stop()
        self.thread.join()

    def stats(self):
        return WorkerStats(
            self.active, self.w.total, self.w.nbytes, self.w.accepted, self.w.accept_errors
        )

    cdef int set_listen(self, int fd, ListenCfg *cfg):
        # Listen on fd (again: its settings replaced for new clients); -1 when every slot
        # is taken.
        cdef uint64_t one = 1
        cdef int i, free_slot = -1
        cdef Listener *l = NULL
        c.pthread_mutex_lock(&self.w.lock)
        for i in range(MAX_LISTENERS):
            if self.w.listeners[i].fd == fd:
                l = &self.w.listeners[i]
                break
            if self.w.listeners[i].fd < 0 and free_slot < 0:
                free_slot = i
        if l == NULL and free_slot >= 0:
            l = &self.w.listeners[free_slot]
            l.fd = fd
            l.listening = 0
            l.resume_ns = 0
            if free_slot >= self.w.nlisteners:
                self.w.nlisteners = free_slot + 1
        if l != NULL:
            l.next = cfg[0]
            l.dirty = 1
            l.want = 1
        c.pthread_mutex_unlock(&self.w.lock)
        c.write(self.w.wakefd, &one, sizeof(one))
        return 0 if l != NULL else -1

    cdef void set_unlisten(self, int fd):
        # Let go of fd (-1: of every listener).
        cdef uint64_t one = 1
        cdef int i
        c.pthread_mutex_lock(&self.w.lock)
        for i in range(self.w.nlisteners):
            if self.w.listeners[i].fd >= 0 and (fd < 0 or self.w.listeners[i].fd == fd):
                self.w.listeners[i].want = 0
        c.pthread_mutex_unlock(&self.w.lock)
        c.write(self.w.wakefd, &one, sizeof(one))

    cdef bint holds(self, int fd):
        # Whether this worker has not let go of fd yet (-1: of any listener).
        cdef int i
        cdef bint held = False
        c.pthread_mutex_lock(&self.w.lock)
        for i in range(self.w.nlisteners):
            if self.w.listeners[i].fd >= 0 and (fd < 0 or self.w.listeners[i].fd == fd):
                held = True
        c.pthread_mutex_unlock(&self.w.lock)
        return held

    @property
    def active(self):
        return active_pairs(&self.w)

    def __dealloc__(self):
        cdef int i
        if self.w.epfd >= 0:
            c.close(self.w.epfd)
        if self.w.wakefd >= 0:
            c.close(self.w.wakefd)
        for i in range(self.w.npool):
            free(self.w.pool[i])
        for i in range(2 * self.w.npipes):
            c.close(self.w.pipes[i])
        free(self.w.pool)
        free(self.w.scratch)
        for i in range(self.w.ndone):
            free(self.w.done[i].ps)  # reports never collected
        free_pathsets(self.w.ps_pool)
        free_pathsets(self.w.ps_returned)
        free(self.w.done)
        free(self.w.spare)
        free(self.w.pub.conns)
        free(self.w.pub.paths)
        free(self.w.pub_back.conns)
        free(self.w.pub_back.paths)
        free(self.w.open_by_tag)
        free(self.w.accepted_by_tag)
        c.pthread_mutex_destroy(&self.w.lock)
        c.pthread_mutex_destroy(&self.w.out_lock)
        c.pthread_mutex_destroy(&self.w.pub_lock)


@cython.final
cdef class Relay:
    """Worker threads that pump bytes between pairs of sockets; see _relay.pyi."""

    cdef list _workers
    cdef list _results  # taken from the workers when they stopped
    cdef int _notifyfd
    cdef bint _closed
    cdef bint _splice  # defaults for pairs and listeners that name none
    cdef double _idle_timeout

    def __cinit__(self):
        self._notifyfd = -1

    def __init__(self, int workers=1, size_t bufsize=131072, double idle_timeout=0.0,
                 bint splice=False, double busy_poll=0.0, bint path_stats=True):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if bufsize < 4096:
            raise ValueError("bufsize must be at least 4096")
        _check_seconds("idle_timeout", idle_timeout, True)
        _check_seconds("busy_poll", busy_poll, True)
        self._results = []
        self._splice = splice
        self._idle_timeout = idle_timeout
        self._notifyfd = c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC)
        if self._notifyfd < 0:
            raise OSError(c.errno, os.strerror(c.errno))
        self._workers = []
        for _ in range(workers):
            self._workers.append(_Worker(bufsize, self._notifyfd, busy_poll, path_stats))

    def __reduce__(self):
        raise TypeError("a relay holds fds and cannot be pickled")

    @property
    def notify_fd(self):
        return self._notifyfd

    @property
    def active(self):
        return sum([(<_Worker>w).active for w in self._workers])

    def add(self, int fd_a, int fd_b, conn_id, int mptcp_fd=-1, *, tag=0, idle_timeout=None,
            splice=None):
        # Both fds belong to the relay from this call on: if it fails, they are closed.
        try:
            self._add(fd_a, fd_b, conn_id, mptcp_fd, tag, idle_timeout, splice)
        except BaseException:
            _close_fds(fd_a, fd_b)
            raise

    cdef _add(self, int fd_a, int fd_b, uint64_t conn_id, int mptcp_fd, tag, idle_timeout,
              splice):
        cdef _Worker best = None
        cdef _Worker wk
        cdef Pair *p
        cdef bint splicing = self._splice if splice is None else splice
        if self._closed:
            raise RuntimeError("the relay is closed")
        if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
            raise ValueError("two distinct open fds are needed")
        cdef uint32_t ptag = _check_tag(tag)
        cdef int64_t idle_ns = self._nanoseconds("idle_timeout", idle_timeout)
        for fd in (fd_a, fd_b):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))
        if splicing:
            # A blocking fd would let one splice() (it has no MSG_DONTWAIT, unlike the
            # recv/send of the copy path) hold up the thread.
            os.set_blocking(fd_a, False)
            os.set_blocking(fd_b, False)
        for wk in self._workers:
            if best is None or active_pairs(&wk.w) < active_pairs(&best.w):
                best = wk
        p = <Pair *>calloc(1, sizeof(Pair))
        if p == NULL:
            raise MemoryError()
        p.side[0].fd = fd_a
        p.side[1].fd = fd_b
        p.side[0].pair = p
        p.side[1].pair = p
        p.conn_id = conn_id
        p.tag = ptag
        p.idle_ns = idle_ns
        p.splice = splicing
        p.mptcp_side = 0 if mptcp_fd == fd_a else 1 if mptcp_fd == fd_b else -1
        p.start_ns = now_ns()
        addr_of_peer(&p.peer_a, fd_a)
        addr_of_peer(&p.upstream, fd_b)
        best.push(p)

    cdef int64_t _nanoseconds(self, name, value) except? -1:
        # A per-pair time (None: the relay's default) as the engine holds it.
        if value is None:
            value = self._idle_timeout
        _check_seconds(name, value, True)
        return <int64_t>(value * NS)

    def new_id(self):
        return new_conn_id()

    def listen(self, int fd, int family, tuple sockaddr, bint mptcp, int mptcp_side=-1,
               unsigned int mark=0, double connect_timeout=10.0, *, tag=0, idle_timeout=None,
               splice=None):
        cdef _Worker w
        cdef int one = 1
        cdef ListenCfg cfg
        if self._closed:
            raise RuntimeError("the relay is closed")
        if mptcp_side not in (-1, 0, 1):
            raise ValueError(f"mptcp_side must be -1, 0 or 1, not {mptcp_side}")
        _check_seconds("connect_timeout", connect_timeout, False)
        memset(&cfg, 0, sizeof(cfg))
        cfg.tag = _check_tag(tag)
        cfg.idle_ns = self._nanoseconds("idle_timeout", idle_timeout)
        cfg.connect_ns = <int64_t>(connect_timeout * NS)
        cfg.splice = self._splice if splice is None else splice
        raw = _sockaddr_bytes(family, sockaddr)
        memcpy(&cfg.up_addr, <char *>raw, len(raw))
        cfg.up_len = len(raw)
        cfg.up_family, cfg.up_proto, cfg.up_mptcp_side = family, 262 if mptcp else 0, mptcp_side
        cfg.mark = mark
        # accept4() in a loop until EAGAIN: on a blocking listener the worker would hang in
        # it as soon as another worker took the connection.
        os.set_blocking(fd, False)
        # Accepted sockets inherit TCP_NODELAY: no setsockopt() per client.
        if c.setsockopt(fd, c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one)) != 0:
            raise OSError(c.errno, os.strerror(c.errno))
        for w in self._workers:
            if w.set_listen(fd, &cfg) < 0:
                self.unlisten(fd)
                raise RuntimeError(f"a relay serves at most {MAX_LISTENERS} listeners")

    def unlisten(self, fd=None):
        cdef _Worker w
        for w in self._workers:
            w.set_unlisten(-1 if fd is None else fd)

    def holds(self, int fd):
        cdef _Worker w
        return any([w.holds(fd) for w in self._workers])

    @property
    def listening(self):
        cdef _Worker w
        return any([w.holds(-1) for w in self._workers])

    def accepted(self, tag):
        cdef _Worker w
        cdef uint32_t t = _check_tag(tag)
        return sum([c.__atomic_load_i64(&w.w.accepted_by_tag[t], c.__ATOMIC_ACQUIRE)
                    for w in self._workers])

    def open_pairs(self, tag):
        cdef _Worker w
        cdef uint32_t t = _check_tag(tag)
        return max(0, sum([c.__atomic_load_i64(&w.w.open_by_tag[t], c.__ATOMIC_ACQUIRE)
                           for w in self._workers]))

    def collect(self):
        cdef uint64_t junk
        cdef _Worker w
        if self._notifyfd >= 0:
            c.read(self._notifyfd, &junk, sizeof(junk))
        out, self._results = self._results, []
        for w in self._workers:
            w.take(out)
        return out

    def stats(self):
        return [(<_Worker>w).stats() for w in self._workers]

    def connections(self):
        cdef _Worker w
        cdef list out = []
        cdef int64_t now = now_ns()
        for w in self._workers:
            w.connections(out, now)
        return out

    def path_totals(self):
        cdef _Worker w
        cdef dict out = {}
        cdef uint64_t reinjected = 0
        for w in self._workers:
            reinjected += w.path_totals(out)
        return out, reinjected

    def close(self):
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            (<_Worker>w).stop()
            (<_Worker>w).take(self._results)
        self._workers = []
        if self._notifyfd >= 0:
            c.close(self._notifyfd)
            self._notifyfd = -1

    def __dealloc__(self):
        # A relay dropped without close(): tell the workers to abort their pairs and stop,
        # but neither wait for them (at interpreter exit they may never run again) nor
        # close the notify fd they may still write to. Never raises.
        cdef _Worker w
        if not self._closed and self._workers is not None:
            for w in self._workers:
                w.signal_stop()


def _check_tag(tag):
    if not 0 <= tag < MAX_TAGS:
        raise ValueError(f"tag must be from 0 to {MAX_TAGS - 1}, not {tag}")
    return tag


def _close_fds(int fd_a, int fd_b):
    for fd in {fd_a, fd_b}:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _check_seconds(name, double value, bint zero_ok):
    # A time the engine holds in int64 nanoseconds: finite and below 2**63 ns (292 years).
    if not (value >= 0 if zero_ok else value > 0) or not value <= MAX_SECONDS:
        raise ValueError(f"{name} must be {'at least 0' if zero_ok else 'more than 0'} "
                         f"and at most {MAX_SECONDS:g} seconds, not {value}")


def _sockaddr_bytes(int family, tuple sockaddr):
    # struct sockaddr_in / sockaddr_in6, as connect() takes it.
    cdef bytes port = struct.pack("!H", sockaddr[1])
    if family == socket.AF_INET:
        return struct.pack("=H", family) + port + socket.inet_pton(family, sockaddr[0]) + bytes(8)
    return (struct.pack("=H", family) + port + bytes(4) + socket.inet_pton(family, sockaddr[0])
            + struct.pack("=I", sockaddr[3] if len(sockaddr) > 3 else 0))
