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


cdef int pipe_get(WorkerState *w, Half *hf) noexcept nogil:
    # An empty pipe for a half that starts splicing; -1 when there is none (out of fds).
    if w.npipes > 0:
        w.npipes -= 1
        hf.pipe[0] = w.pipes[2 * w.npipes]
        hf.pipe[1] = w.pipes[2 * w.npipes + 1]
    else:
        if c.pipe2(hf.pipe, c.O_NONBLOCK | c.O_CLOEXEC) != 0:
            return -1
        # As large as a read, if the kernel allows it (else the default 64 KiB).
        c.fcntl(hf.pipe[1], c.F_SETPIPE_SZ, <int>w.bufsize)
    hf.has_pipe = 1
    hf.inpipe = 0
    return 0


cdef void pipe_put(WorkerState *w, Half *hf) noexcept nogil:
    # An empty pipe goes back to the pool; one still holding bytes is closed with them.
    if not hf.has_pipe:
        return
    if hf.inpipe == 0 and w.npipes < POOL_KEEP:
        w.pipes[2 * w.npipes] = hf.pipe[0]
        w.pipes[2 * w.npipes + 1] = hf.pipe[1]
        w.npipes += 1
    else:
        c.close(hf.pipe[0])
        c.close(hf.pipe[1])
    hf.has_pipe = 0
    hf.inpipe = 0


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
        pipe_put(w, &p.half[i])
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


cdef inline void moved_on(WorkerState *w, Pair *p, int h, ssize_t n) noexcept nogil:
    # n bytes of half h reached their destination.
    p.half[h].nbytes += n
    w.nbytes += n
    p.last_ns = w.now


cdef inline void requeue(WorkerState *w, Pair *p) noexcept nogil:
    # Out of read budget: another turn after everyone else.
    if not p.queued:
        p.queued = 1
        p.ready_next = w.ready
        w.ready = p


cdef void half_eof(Pair *p, int h) noexcept nogil:
    # EOF from side h: nothing is pending for the other side, so half-close it now.
    sample_mptcp(p)
    c.shutdown(p.side[1 - h].fd, c.SHUT_WR)
    p.half[h].done = 1
    p.side[h].readable = 0


cdef int splice_half(WorkerState *w, Pair *p, int h, int budget, size_t moved) noexcept nogil:
    # A splicing half: src -> pipe -> dst, the bytes never copied to user space. Returns -1
    # when the pair was closed, 1 when splice() is not supported here (the caller copies).
    # Unlike a short recv(), a short splice() does not mean the socket is empty (the pipe
    # also fills by its slots, one per packet fragment), so it reads on to EAGAIN.
    cdef Side *src = &p.side[h]
    cdef Side *dst = &p.side[1 - h]
    cdef Half *hf = &p.half[h]
    cdef ssize_t n
    cdef int err
    while True:
        if hf.inpipe > 0:
            if not dst.writable:
                return 0
            n = c.splice(hf.pipe[0], NULL, dst.fd, NULL, hf.inpipe,
                         c.SPLICE_F_MOVE | c.SPLICE_F_NONBLOCK)
            err = c.errno
            if n < 0:
                if err == c.EAGAIN or err == c.EINTR:
                    dst.writable = 0
                    return 0
                fail(w, p, err)
                return -1
            moved_on(w, p, h, n)
            hf.inpipe -= n
            if hf.inpipe > 0:
                dst.writable = 0  # the destination is full: wait for EPOLLOUT
                return 0
        if not src.readable:
            break
        if budget == 0:
            requeue(w, p)
            return 0
        budget -= 1
        n = c.splice(src.fd, NULL, hf.pipe[1], NULL, w.bufsize,
                     c.SPLICE_F_MOVE | c.SPLICE_F_NONBLOCK)
        err = c.errno
        if n > 0:
            hf.inpipe = n
            moved += n
            p.last_ns = w.now
        elif n == 0:
            half_eof(p, h)
            break
        elif err == c.EAGAIN:
            src.readable = 0
            break
        elif err == c.EINVAL or err == c.ENOSYS:
            hf.splicing = -1  # nothing was moved: copy this half from now on
            pipe_put(w, hf)
            return 1
        elif err != c.EINTR:
            fail(w, p, err)
            return -1
    # The pipe is empty here. A turn that moved little ends the bulk: copy again (a short
    # recv() saves the call that only says EAGAIN) and give the pipe back.
    if moved < SPLICE_MIN or hf.done:
        hf.splicing = 0
        pipe_put(w, hf)
    return 0


cdef int pump_half(WorkerState *w, Pair *p, int h) noexcept nogil:
    # Returns -1 when the pair was closed.
    cdef Side *src = &p.side[h]
    cdef Side *dst = &p.side[1 - h]
    cdef Half *hf = &p.half[h]
    cdef ssize_t n, s
    cdef int err, rc, budget = READ_BUDGET
    if hf.done:
        return 0
    if hf.splicing > 0:
        rc = splice_half(w, p, h, budget, 0)
        if rc != 1:
            return rc
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
        moved_on(w, p, h, s)  # a slow reader draining what is pending is not idle
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
            requeue(w, p)
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
                moved_on(w, p, h, s)
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
            if <size_t>n >= SPLICE_MIN and w.splice and hf.splicing == 0 and pipe_get(w, hf) == 0:
                # Bulk: splice the rest of this burst and what follows.
                hf.splicing = 1
                rc = splice_half(w, p, h, budget, n)
                if rc != 1:
                    return rc
                continue
            if <size_t>n < w.bufsize and not src.rdhup:
                # A short read emptied the socket (TCP, MPTCP and AF_UNIX all copy all
                # they hold): new bytes bring a new edge, so skip the recv that would
                # only say EAGAIN. Once a FIN is signalled, read on until the EOF.
                src.readable = 0
        elif n == 0:
            half_eof(p, h)
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


cdef void prune_ready(WorkerState *w) noexcept nogil:
    # A pair queued for another turn and finished afterwards must leave the ready list
    # before its memory is freed (and reused by the next calloc).
    cdef Pair *p = w.ready
    cdef Pair *keep = NULL
    cdef Pair *nxt
    while p != NULL:
        nxt = p.ready_next
        if p.dead:
            p.queued = 0
        else:
            p.ready_next = keep
            keep = p
        p = nxt
    w.ready = keep


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
        if w.ready != NULL or w.now - w.last_event < w.busy_ns:
            timeout = 0  # more to do, or busy polling: the next event is handled unslept
        elif w.pairs != NULL or (w.want_listen and not w.listening):
            timeout = 250
        else:
            timeout = -1
        if w.notify_pending and (timeout < 0 or timeout > NOTIFY_MS):
            timeout = NOTIFY_MS
        n = c.epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
        if n < 0:
            if c.errno == c.EINTR:
                continue
            w.fatal_errno = c.errno
            abort_all(w)
            c.write(w.notifyfd, &one, sizeof(one))
            return -1
        w.now = now_ns()
        if n > 0:
            w.last_event = w.now
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
        if w.graveyard != NULL and w.ready != NULL:
            prune_ready(w)
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
        if w.notify_pending and w.now - w.last_notify >= NOTIFY_MS * 1000000:
            # Each write wakes the control thread: at most one per NOTIFY_MS.
            w.notify_pending = 0
            w.last_notify = w.now
            c.write(w.notifyfd, &one, sizeof(one))


# -- accept() and the upstream connect() inside the worker: the fast path for a fixed
# upstream address (Relay.listen). The control plane keeps everything that needs a
# decision per connection (transparent mode, names to resolve, limits).

cdef uint64_t next_conn_id = 1  # shared by every relay in the process, taken atomically


cdef inline uint64_t new_conn_id() noexcept nogil:
    return c.__atomic_fetch_add(&next_conn_id, 1, c.__ATOMIC_RELAXED)


cdef void sync_listener(WorkerState *w) noexcept nogil:
    # Make the epoll set hold the listener exactly when the control plane wants it and
    # accepting is not paused. EPOLLEXCLUSIVE: one worker is woken per new connection.
    cdef c.epoll_event ev
    if w.want_listen and not w.listening and w.now >= w.resume_ns:
        ev.events = c.EPOLLIN | c.EPOLLEXCLUSIVE
        ev.data.ptr = <void *>w
        if c.epoll_ctl(w.epfd, c.EPOLL_CTL_ADD, w.listenfd, &ev) == 0:
            w.listening = 1
    elif w.listening and (not w.want_listen or w.now < w.resume_ns):
        ev.events = 0
        c.epoll_ctl(w.epfd, c.EPOLL_CTL_DEL, w.listenfd, &ev)
        w.listening = 0


cdef void keep_client_address(Pair *p, c.sockaddr_storage *ss) noexcept nogil:
    cdef c.sockaddr_in *sin
    cdef c.sockaddr_in6 *sin6
    p.client_family = ss.ss_family
    if ss.ss_family == c.AF_INET:
        sin = <c.sockaddr_in *>ss
        p.client_port = c.ntohs(sin.sin_port)
        memcpy(p.client_addr, &sin.sin_addr, 4)
    elif ss.ss_family == c.AF_INET6:
        sin6 = <c.sockaddr_in6 *>ss
        p.client_port = c.ntohs(sin6.sin6_port)
        memcpy(p.client_addr, &sin6.sin6_addr, 16)


cdef void accept_some(WorkerState *w) noexcept nogil:
    cdef c.sockaddr_storage ss
    cdef c.socklen_t sslen
    cdef int cfd, ufd, err, i, rc
    cdef Pair *p
    for i in range(ACCEPT_BATCH):
        sslen = sizeof(ss)
        cfd = c.accept4(w.listenfd, <c.sockaddr *>&ss, &sslen,
                        c.SOCK_NONBLOCK | c.SOCK_CLOEXEC)
        if cfd < 0:
            err = c.errno
            if err == c.EMFILE or err == c.ENFILE or err == c.ENOBUFS or err == c.ENOMEM:
                # Out of fds or memory: leave the listener alone for 100 ms, not spin on it.
                w.accept_errors += 1
                w.resume_ns = w.now + NS // 10
                sync_listener(w)
                if put_done(w, R_ACCEPT_ERROR, err) != NULL:
                    c.pthread_mutex_unlock(&w.out_lock)
                return
            if err == c.EAGAIN:
                return
            continue  # ECONNABORTED and the like: that client is gone already
        w.accepted += 1
        p = <Pair *>calloc(1, sizeof(Pair))
        if p == NULL:
            c.close(cfd)
            continue
        p.side[0].fd = cfd
        p.side[1].fd = -1
        p.side[0].pair = p
        p.side[1].pair = p
        p.conn_id = new_conn_id()
        p.mptcp_side = w.up_mptcp_side
        p.start_ns = now_ns()
        keep_client_address(p, &ss)
        c.pthread_mutex_lock(&w.lock)
        w.total += 1
        c.pthread_mutex_unlock(&w.lock)
        p.next = w.pairs
        if w.pairs != NULL:
            w.pairs.prev = p
        w.pairs = p
        ufd = c.socket(w.up_family, c.SOCK_STREAM | c.SOCK_NONBLOCK | c.SOCK_CLOEXEC,
                       w.up_proto)
        if ufd < 0:
            err = c.errno
            finish(w, p, R_FAILED, err)
            if err == c.EMFILE or err == c.ENFILE or err == c.ENOBUFS or err == c.ENOMEM:
                # No fd for the upstream: accept no more clients we cannot serve for now.
                w.accept_errors += 1
                w.resume_ns = w.now + NS // 10
                sync_listener(w)
                return
            continue
        p.side[1].fd = ufd
        if w.mark:
            c.setsockopt(ufd, c.SOL_SOCKET, c.SO_MARK, &w.mark, sizeof(w.mark))
        rc = c.connect(ufd, <c.sockaddr *>&w.up_addr, w.up_len)
        err = c.errno
        if rc != 0 and err != c.EINPROGRESS:
            finish(w, p, R_FAILED, err)
            continue
        p.connecting = 1  # even when connect() is done already: EPOLLOUT follows at once
        register(w, p)


cdef int connect_pending(WorkerState *w, Pair *p, Side *s, uint32_t ev) noexcept nogil:
    # An event on a pair whose upstream is still connecting. Returns 1 while nothing may
    # move yet (the client's readiness is kept in its Side for later), 0 once connected.
    cdef int soerr = 0
    cdef int one = 1
    cdef c.socklen_t slen = sizeof(soerr)
    if s == &p.side[0]:
        if ev & c.EPOLLERR:
            c.getsockopt(s.fd, c.SOL_SOCKET, c.SO_ERROR, &soerr, &slen)
            if soerr:
                fail(w, p, soerr)  # the client gave up while we were connecting
        return 1
    if not ev & (c.EPOLLOUT | c.EPOLLERR | c.EPOLLHUP):
        return 1
    c.getsockopt(s.fd, c.SOL_SOCKET, c.SO_ERROR, &soerr, &slen)
    if soerr:
        finish(w, p, R_FAILED, soerr)
        return 1
    p.connecting = 0
    # A relay must not add Nagle's delay on top of the application's own choice.
    c.setsockopt(p.side[0].fd, c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))
    c.setsockopt(p.side[1].fd, c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))
    sample_mptcp(p)
    return 0


include "_relay_api.pxi"
