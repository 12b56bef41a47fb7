# The relay engine: one epoll per worker thread, edge-triggered, recv/send on raw fds,
# the whole loop inside `with nogil`. See DESIGN.md "The relay, precisely".
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

from mptcpproxy cimport _sys as c

import os
import socket
import struct
import threading

from mptcpproxy._results import REASONS, Result, WorkerStats

cdef enum:
    R_CLOSED = 0
    R_RESET = 1
    R_TIMEOUT = 2
    R_ERROR = 3
    R_ABORTED = 4
    R_FAILED = 5  # the upstream could not be reached (accepted by the worker itself)
    R_ACCEPT_ERROR = 6  # not a pair: accept() failed for want of fds or memory

cdef enum:
    MAX_EVENTS = 256
    READ_BUDGET = 16  # reads per half and turn: a fast sender cannot starve the others
    POOL_KEEP = 64  # spare pending buffers a worker keeps
    NS = 1000000000
    ACCEPT_BATCH = 64  # accepts per wake-up, so open pairs get their turn in between


cdef struct Side:
    int fd
    int readable  # edge-triggered: set by an event, cleared by EAGAIN or a short read
    int writable
    int rdhup  # the peer's FIN (or an error) was signalled: read on until EOF
    Pair *pair


cdef struct Half:
    # Bytes from side[i] to side[1 - i]. `buf` holds only what the destination would not
    # take; it is NULL while nothing is pending, so an idle pair owns no user-space buffer.
    char *buf
    size_t off
    size_t len
    uint64_t nbytes
    int done  # EOF read and shutdown(dst, SHUT_WR) done


cdef struct Pair:
    Side side[2]
    Half half[2]
    uint64_t conn_id
    int mptcp_side  # index of the side whose MPTCP status is reported, or -1
    int is_mptcp
    int subflows
    int64_t start_ns
    int64_t last_ns  # the last time a byte moved
    int64_t sampled_ns  # the last MPTCP status sample
    int reason
    int err
    int dead
    int queued  # on the worker's ready list
    int connecting  # accepted by the worker, upstream connect() under way
    int client_family  # set for pairs the worker accepted itself
    uint16_t client_port
    uint8_t client_addr[16]
    Pair *prev
    Pair *next  # the worker's list of open pairs, or the incoming / graveyard chain
    Pair *ready_next


cdef struct Done:
    uint64_t conn_id
    uint64_t bytes_ab
    uint64_t bytes_ba
    int64_t duration_ns
    int reason
    int err
    int is_mptcp
    int subflows
    int client_family
    uint16_t client_port
    uint8_t client_addr[16]


cdef struct WorkerState:
    int epfd
    int wakefd
    int notifyfd
    int stopping
    c.pthread_mutex_t lock
    Pair *incoming
    Pair *pairs
    Pair *ready
    Pair *graveyard
    char *scratch
    size_t bufsize
    char **pool
    int npool
    # Finished pairs wait here for collect(), which swaps `done` with `spare` under
    # out_lock: the worker never needs the GIL to report.
    c.pthread_mutex_t out_lock
    Done *done
    int ndone
    int done_cap
    Done *spare
    int spare_cap
    int notify_pending
    int64_t now
    int64_t idle_ns
    int64_t next_scan
    uint64_t total  # written by the control thread only (under lock)
    uint64_t finished  # written by the worker only
    uint64_t nbytes
    int fatal_errno
    # accept + connect in the worker (Relay.listen): the fast path for a fixed upstream
    int listenfd
    int want_listen  # written by the control thread
    int listening  # written by the worker: the listener is in its epoll set
    int64_t resume_ns  # accepting paused (out of fds) until then
    c.sockaddr_storage up_addr
    c.socklen_t up_len
    int up_family
    int up_proto
    int up_mptcp_side
    unsigned int mark
    int64_t connect_ns
    uint64_t accepted
    uint64_t accept_errors


cdef inline int64_t now_ns() noexcept nogil:
    cdef c.timespec ts
    c.clock_gettime(c.CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * NS + ts.tv_nsec


cdef void sample_mptcp(Pair *p) noexcept nogil:
    # TCP_IS_MPTCP: 1 while the connection really runs MPTCP, 0 after a fallback to TCP.
    cdef int val = 0
    cdef c.socklen_t vlen = sizeof(val)
    cdef c.mptcp_info_head info
    cdef c.socklen_t ilen = sizeof(info)
    if p.mptcp_side < 0:
        return
    cdef int fd = p.side[p.mptcp_side].fd
    if c.getsockopt(fd, c.IPPROTO_TCP, c.TCP_IS_MPTCP, &val, &vlen) != 0 or val == 0:
        return
    p.is_mptcp = 1
    if p.subflows < 1:
        p.subflows = 1
    if c.getsockopt(fd, c.SOL_MPTCP, c.MPTCP_INFO, &info, &ilen) == 0 and ilen >= 1:
        if info.mptcpi_subflows + 1 > p.subflows:
            p.subflows = info.mptcpi_subflows + 1


cdef char *pool_get(WorkerState *w) noexcept nogil:
    if w.npool > 0:
        w.npool -= 1
        return w.pool[w.npool]
    return <char *>malloc(w.bufsize)


cdef void pool_put(WorkerState *w, char *buf) noexcept nogil:
    if buf == NULL:
        return
    if w.npool < POOL_KEEP:
        w.pool[w.npool] = buf
        w.npool += 1
    else:
        free(buf)


cdef void set_rst(int fd) noexcept nogil:
    # SO_LINGER {1, 0}: close() sends RST instead of FIN (an abortive close).
    cdef c.linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    c.setsockopt(fd, c.SOL_SOCKET, c.SO_LINGER, &lg, sizeof(lg))


cdef void finish(WorkerState *w, Pair *p, int reason, int err) noexcept nogil:
    cdef int i
    cdef Done *d
    if p.dead:
        return
    sample_mptcp(p)
    if reason == R_RESET or reason == R_ERROR or reason == R_ABORTED:
        # Pass an abortive close on as an abortive close: the peers learn the stream is cut.
        set_rst(p.side[0].fd)
        set_rst(p.side[1].fd)
    for i in range(2):
        if p.side[i].fd >= 0:
            c.close(p.side[i].fd)
        pool_put(w, p.half[i].buf)
        p.half[i].buf = NULL
    p.dead = 1
    if p.prev != NULL:
        p.prev.next = p.next
    else:
        w.pairs = p.next
    if p.next != NULL:
        p.next.prev = p.prev
    # Freed after the batch: later events of this batch may still point at it.
    p.next = w.graveyard
    w.graveyard = p
    w.finished += 1
    d = put_done(w, reason, err)
    if d == NULL:
        return  # the pair is closed; only its report is lost under memory exhaustion
    d.conn_id = p.conn_id
    d.bytes_ab = p.half[0].nbytes
    d.bytes_ba = p.half[1].nbytes
    d.duration_ns = now_ns() - p.start_ns
    d.is_mptcp = p.is_mptcp
    d.subflows = p.subflows
    d.client_family = p.client_family
    d.client_port = p.client_port
    memcpy(d.client_addr, p.client_addr, 16)
    c.pthread_mutex_unlock(&w.out_lock)


cdef Done *put_done(WorkerState *w, int reason, int err) noexcept nogil:
    # A zeroed report in the outbox, returned with out_lock held (NULL, unlocked, when
    # memory is exhausted).
    cdef Done *d
    c.pthread_mutex_lock(&w.out_lock)
    if w.ndone == w.done_cap:
        d = <Done *>malloc(2 * w.done_cap * sizeof(Done))
        if d == NULL:
            c.pthread_mutex_unlock(&w.out_lock)
            return NULL
        memcpy(d, w.done, w.ndone * sizeof(Done))
        free(w.done)
        w.done = d
        w.done_cap *= 2
    d = &w.done[w.ndone]
    w.ndone += 1
    memset(d, 0, sizeof(Done))
    d.reason = reason
    d.err = err
    w.notify_pending = 1
    return d


cdef inline void fail(WorkerState *w, Pair *p, int err) noexcept nogil:
    finish(w, p, R_RESET if err == c.ECONNRESET or err == c.EPIPE else R_ERROR, err)


cdef int pump_half(WorkerState *w, Pair *p, int h) noexcept nogil:
    # Returns -1 when the pair was closed.
    cdef Side *src = &p.side[h]
    cdef Side *dst = &p.side[1 - h]
    cdef Half *hf = &p.half[h]
    cdef ssize_t n, s
    cdef int err, budget = READ_BUDGET
    if hf.done:
        return 0
    if hf.len > 0:
        if not dst.writable:
            return 0
        s = c.send(dst.fd, hf.buf + hf.off, hf.len, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
        err = c.errno
        if s < 0:
            if err == c.EAGAIN or err == c.EINTR:
                dst.writable = 0
                return 0
            fail(w, p, err)
            return -1
        hf.nbytes += s
        w.nbytes += s
        p.last_ns = w.now  # a slow reader draining what is pending is not idle
        hf.off += s
        hf.len -= s
        if hf.len > 0:
            dst.writable = 0  # a short send: the destination is full, wait for EPOLLOUT
            return 0
        pool_put(w, hf.buf)
        hf.buf = NULL
        hf.off = 0
    # Backpressure: the source is read only while nothing is pending for the destination.
    while src.readable:
        if budget == 0:
            if not p.queued:
                p.queued = 1
                p.ready_next = w.ready
                w.ready = p
            return 0
        budget -= 1
        n = c.recv(src.fd, w.scratch, w.bufsize, c.MSG_DONTWAIT)
        err = c.errno
        if n > 0:
            p.last_ns = w.now
            s = 0
            if dst.writable:
                s = c.send(dst.fd, w.scratch, n, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
                err = c.errno
                if s < 0:
                    if err != c.EAGAIN and err != c.EINTR:
                        fail(w, p, err)
                        return -1
                    s = 0
                hf.nbytes += s
                w.nbytes += s
            if s < n:
                hf.buf = pool_get(w)
                if hf.buf == NULL:
                    fail(w, p, 12)  # ENOMEM: the bytes read cannot be kept
                    return -1
                memcpy(hf.buf, w.scratch + s, n - s)
                hf.off = 0
                hf.len = n - s
                dst.writable = 0
                return 0
            if <size_t>n < w.bufsize and not src.rdhup:
                # A short read emptied the socket (TCP, MPTCP and AF_UNIX all copy all
                # they hold): new bytes bring a new edge, so skip the recv that would
                # only say EAGAIN. Once a FIN is signalled, read on until the EOF.
                src.readable = 0
        elif n == 0:
            # EOF: nothing is pending (see above), so half-close the destination now.
            sample_mptcp(p)
            c.shutdown(dst.fd, c.SHUT_WR)
            hf.done = 1
            src.readable = 0
            return 0
        elif err == c.EAGAIN:
            src.readable = 0
        elif err != c.EINTR:
            fail(w, p, err)
            return -1
    return 0


cdef void pump(WorkerState *w, Pair *p) noexcept nogil:
    if pump_half(w, p, 0) < 0 or pump_half(w, p, 1) < 0:
        return
    if p.half[0].done and p.half[1].done:
        finish(w, p, R_CLOSED, 0)


cdef void take_incoming(WorkerState *w) noexcept nogil:
    cdef Pair *p
    cdef Pair *nxt
    cdef uint64_t junk
    c.read(w.wakefd, &junk, sizeof(junk))
    c.pthread_mutex_lock(&w.lock)
    p = w.incoming
    w.incoming = NULL
    c.pthread_mutex_unlock(&w.lock)
    while p != NULL:
        nxt = p.next
        p.prev = NULL
        p.next = w.pairs
        if w.pairs != NULL:
            w.pairs.prev = p
        w.pairs = p
        if register(w, p) == 0:
            sample_mptcp(p)
        p = nxt
    sync_listener(w)


cdef int register(WorkerState *w, Pair *p) noexcept nogil:
    # Into the epoll set, once, never modified: edge-triggered readiness is kept in Side.
    # The pair is already on w.pairs; on failure it is finished (returns -1).
    cdef c.epoll_event ev
    cdef int i
    p.last_ns = p.sampled_ns = w.now
    for i in range(2):
        ev.events = c.EPOLLIN | c.EPOLLOUT | c.EPOLLRDHUP | c.EPOLLET
        ev.data.ptr = &p.side[i]
        if c.epoll_ctl(w.epfd, c.EPOLL_CTL_ADD, p.side[i].fd, &ev) != 0:
            finish(w, p, R_ERROR, c.errno)
            return -1
    return 0


cdef void abort_all(WorkerState *w) noexcept nogil:
    take_incoming(w)
    while w.pairs != NULL:
        finish(w, w.pairs, R_ABORTED, 0)
    w.want_listen = 0
    sync_listener(w)


cdef void scan(WorkerState *w) noexcept nogil:
    # Idle timeouts, and the MPTCP status of busy pairs once a second: subflows come and
    # go during a connection, and after a reset the kernel has already dropped them.
    cdef Pair *p = w.pairs
    cdef Pair *nxt
    while p != NULL:
        nxt = p.next
        if p.connecting:
            if w.now - p.start_ns >= w.connect_ns:
                finish(w, p, R_FAILED, c.ETIMEDOUT)
        elif w.idle_ns > 0 and w.now - p.last_ns >= w.idle_ns:
            finish(w, p, R_TIMEOUT, 0)
        elif p.mptcp_side >= 0 and p.last_ns > p.sampled_ns and w.now - p.sampled_ns >= NS:
            sample_mptcp(p)
            p.sampled_ns = w.now
        p = nxt
    w.next_scan = w.now + NS // 4


cdef int worker_loop(WorkerState *w) noexcept nogil:
    # Runs until the worker is told to stop (returns 1) or epoll_wait fails (-1,
    # fatal_errno set); all of it without the GIL.
    cdef uint64_t one = 1
    cdef c.epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout
    cdef Side *s
    cdef Pair *p
    cdef Pair *q
    cdef uint32_t ev
    cdef int soerr
    cdef c.socklen_t slen
    while True:
        if w.ready != NULL:
            timeout = 0
        elif w.pairs != NULL or (w.want_listen and not w.listening):
            timeout = 250
        else:
            timeout = -1
        n = c.epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
        if n < 0:
            if c.errno == c.EINTR:
                continue
            w.fatal_errno = c.errno
            abort_all(w)
            c.write(w.notifyfd, &one, sizeof(one))
            return -1
        w.now = now_ns()
        for i in range(n):
            if events[i].data.ptr == NULL:
                take_incoming(w)
                continue
            if events[i].data.ptr == <void *>w:
                accept_some(w)
                continue
            s = <Side *>events[i].data.ptr
            p = s.pair
            if p.dead:
                continue
            ev = events[i].events
            if ev & (c.EPOLLIN | c.EPOLLRDHUP | c.EPOLLHUP | c.EPOLLERR):
                s.readable = 1
            if ev & (c.EPOLLRDHUP | c.EPOLLHUP | c.EPOLLERR):
                s.rdhup = 1
            if ev & (c.EPOLLOUT | c.EPOLLHUP | c.EPOLLERR):
                s.writable = 1
            if p.connecting and connect_pending(w, p, s, ev):
                continue  # the flags above are kept for when the upstream is there
            if ev & c.EPOLLERR:
                soerr = 0
                slen = sizeof(soerr)
                c.getsockopt(s.fd, c.SOL_SOCKET, c.SO_ERROR, &soerr, &slen)
                if soerr:
                    fail(w, p, soerr)
                    continue
            pump(w, p)
        # Pairs that used up their read budget get another turn after everyone else.
        p = w.ready
        w.ready = NULL
        while p != NULL:
            q = p
            p = p.ready_next  # read before pump() may queue q again
            q.queued = 0
            if not q.dead:
                pump(w, q)
        if w.now >= w.next_scan:
            if w.pairs != NULL:
                scan(w)
            sync_listener(w)
        while w.graveyard != NULL:
            p = w.graveyard
            w.graveyard = p.next
            free(p)
        if w.stopping:
            abort_all(w)
            while w.graveyard != NULL:
                p = w.graveyard
                w.graveyard = p.next
                free(p)
            return 1
        if w.notify_pending:
            w.notify_pending = 0
            c.write(w.notifyfd, &one, sizeof(one))  # once per batch, not per pair


include "_accept.pxi"


@cython.final
cdef class _Worker:
    cdef WorkerState w
    cdef object thread

    def __cinit__(self):
        self.w.epfd = -1
        self.w.wakefd = -1
        self.w.listenfd = -1

    def __init__(self, size_t bufsize, double idle_timeout, int notifyfd):
        cdef c.epoll_event ev
        self.w.notifyfd = notifyfd
        self.w.bufsize = bufsize
        self.w.idle_ns = <int64_t>(idle_timeout * NS)
        c.pthread_mutex_init(&self.w.lock, NULL)
        c.pthread_mutex_init(&self.w.out_lock, NULL)
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
        if (self.w.scratch == NULL or self.w.pool == NULL or self.w.done == NULL
                or self.w.spare == NULL):
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
            out.append(Result(
                d.conn_id, d.bytes_ab, d.bytes_ba, d.duration_ns / 1e9,
                REASONS[d.reason], d.err, bool(d.is_mptcp), d.subflows, client,
            ))
        self.w.spare, self.w.spare_cap = taken, cap

    cdef void push(self, Pair *p) noexcept:
        cdef uint64_t one = 1
        c.pthread_mutex_lock(&self.w.lock)
        p.next = self.w.incoming
        self.w.incoming = p
        self.w.total += 1
        c.pthread_mutex_unlock(&self.w.lock)
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

    cdef void set_listen(self, int fd, bytes sockaddr, int family, int proto, int mptcp_side,
                         unsigned int mark, double connect_timeout):
        cdef uint64_t one = 1
        memcpy(&self.w.up_addr, <char *>sockaddr, len(sockaddr))
        self.w.up_len = len(sockaddr)
        self.w.up_family, self.w.up_proto, self.w.up_mptcp_side = family, proto, mptcp_side
        self.w.mark = mark
        self.w.connect_ns = <int64_t>(connect_timeout * NS)
        self.w.listenfd = fd
        self.w.want_listen = 1  # the eventfd write below orders the stores before it
        c.write(self.w.wakefd, &one, sizeof(one))

    cdef void set_unlisten(self):
        cdef uint64_t one = 1
        self.w.want_listen = 0
        c.write(self.w.wakefd, &one, sizeof(one))

    @property
    def active(self):
        return self.w.total - self.w.finished

    def __dealloc__(self):
        cdef int i
        if self.w.epfd >= 0:
            c.close(self.w.epfd)
        if self.w.wakefd >= 0:
            c.close(self.w.wakefd)
        for i in range(self.w.npool):
            free(self.w.pool[i])
        free(self.w.pool)
        free(self.w.scratch)
        free(self.w.done)
        free(self.w.spare)
        c.pthread_mutex_destroy(&self.w.lock)
        c.pthread_mutex_destroy(&self.w.out_lock)


@cython.final
cdef class Relay:
    """Worker threads that pump bytes between pairs of sockets; see _relay.pyi."""

    cdef list _workers
    cdef list _results  # taken from the workers when they stopped
    cdef int _notifyfd
    cdef bint _closed

    def __cinit__(self):
        self._notifyfd = -1

    def __init__(self, int workers=1, size_t bufsize=131072, double idle_timeout=0.0):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if bufsize < 4096:
            raise ValueError("bufsize must be at least 4096")
        self._results = []
        self._notifyfd = c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC)
        if self._notifyfd < 0:
            raise OSError(c.errno, os.strerror(c.errno))
        self._workers = []
        for _ in range(workers):
            self._workers.append(_Worker(bufsize, idle_timeout, self._notifyfd))

    def __reduce__(self):
        raise TypeError("a relay holds fds and cannot be pickled")

    @property
    def notify_fd(self):
        return self._notifyfd

    @property
    def active(self):
        return sum([(<_Worker>w).active for w in self._workers])

    def add(self, int fd_a, int fd_b, conn_id, int mptcp_fd=-1):
        cdef _Worker best = None
        cdef _Worker wk
        cdef Pair *p
        if self._closed:
            raise RuntimeError("the relay is closed")
        if fd_a < 0 or fd_b < 0 or fd_a == fd_b:
            raise ValueError("two distinct open fds are needed")
        for wk in self._workers:
            if best is None or wk.w.total - wk.w.finished < best.w.total - best.w.finished:
                best = wk
        p = <Pair *>calloc(1, sizeof(Pair))
        if p == NULL:
            raise MemoryError()
        p.side[0].fd = fd_a
        p.side[1].fd = fd_b
        p.side[0].pair = p
        p.side[1].pair = p
        p.conn_id = conn_id
        p.mptcp_side = 0 if mptcp_fd == fd_a else 1 if mptcp_fd == fd_b else -1
        p.start_ns = now_ns()
        best.push(p)

    def new_id(self):
        return new_conn_id()

    def listen(self, int fd, int family, tuple sockaddr, bint mptcp, int mptcp_side=-1,
               unsigned int mark=0, double connect_timeout=10.0):
        cdef _Worker w
        raw = _sockaddr_bytes(family, sockaddr)
        for w in self._workers:
            w.set_listen(fd, raw, family, 262 if mptcp else 0, mptcp_side, mark,
                         connect_timeout)

    def unlisten(self):
        cdef _Worker w
        for w in self._workers:
            w.set_unlisten()

    @property
    def listening(self):
        cdef _Worker w
        return any([w.w.listening for w in self._workers])

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


def _sockaddr_bytes(int family, tuple sockaddr):
    # struct sockaddr_in / sockaddr_in6, as connect() takes it.
    cdef bytes port = struct.pack("!H", sockaddr[1])
    if family == socket.AF_INET:
        return struct.pack("=H", family) + port + socket.inet_pton(family, sockaddr[0]) + bytes(8)
    return (struct.pack("=H", family) + port + bytes(4) + socket.inet_pton(family, sockaddr[0])
            + struct.pack("=I", sockaddr[3] if len(sockaddr) > 3 else 0))
