# The relay engine: one epoll per worker thread, edge-triggered, recv/send on raw fds,
# the whole loop inside `with nogil`. See docs/design.md "The relay, precisely".
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memcmp, memcpy, memset, strlen

from mptcpproxy.relay cimport _sys as c

import errno
import os
import socket
import stat
import struct
import threading

from mptcpproxy.relay._results import (
    MAX_SECONDS,
    REASONS,
    ConnStat,
    PathStat,
    Result,
    WorkerStats,
)


cdef inline int64_t now_ns() noexcept nogil:
    cdef c.timespec ts
    c.clock_gettime(c.CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * NS + ts.tv_nsec


cdef inline uint64_t active_pairs(WorkerState *w) noexcept nogil:
    # Pairs open on a worker, read from another thread: `finished` first, then `total`
    # (each published with release order), so the difference can never go below zero.
    cdef uint64_t finished = c.__atomic_load_n(&w.finished, c.__ATOMIC_ACQUIRE)
    cdef uint64_t total = c.__atomic_load_n(&w.total, c.__ATOMIC_ACQUIRE)
    return total - finished if total > finished else 0


cdef inline int subflow_came_up(uint8_t state, uint64_t acked, uint64_t received) noexcept nogil:
    # A subflow whose handshake completed. SYN_SENT/SYN_RECV: a join under way (the passive
    # side lists a join only once it completed); CLOSE with nothing acked (our SYN counts
    # +1 once answered) nor received: a refused join. A subflow that came up and closed
    # since stays listed in state CLOSE until the connection's close(): it counts.
    if state == 2 or state == 3 or state == 10:
        return 0
    return state != 7 or acked > 0 or received > 0


cdef int established_subflows(int fd) noexcept nogil:
    # Subflows whose handshake completed, from MPTCP_FULL_INFO's per-subflow tcp_info:
    # mptcpi_subflows also counts a join still waiting for its answer, and a refused one.
    # -1 when the kernel lacks MPTCP_FULL_INFO (before 6.5).
    cdef c.mptcp_full_info mfi
    cdef c.tcp_info_head tcpi[c.MAX_SUBFLOWS]
    cdef c.socklen_t mlen = sizeof(mfi)
    cdef uint32_t i, n
    cdef int count = 0
    memset(&mfi, 0, sizeof(mfi))
    mfi.size_tcpinfo_user = sizeof(c.tcp_info_head)
    mfi.size_arrays_user = c.MAX_SUBFLOWS
    mfi.tcp_info = <uint64_t>&tcpi[0]
    if c.getsockopt(fd, c.SOL_MPTCP, c.MPTCP_FULL_INFO, &mfi, &mlen) != 0:
        return -1
    n = mfi.num_subflows if mfi.num_subflows < c.MAX_SUBFLOWS else c.MAX_SUBFLOWS
    for i in range(n):
        if subflow_came_up(tcpi[i].tcpi_state, tcpi[i].tcpi_bytes_acked,
                           tcpi[i].tcpi_bytes_received):
            count += 1
    return count


cdef void sample_mptcp(WorkerState *w, Pair *p, int what) noexcept nogil:
    # TCP_IS_MPTCP: 1 while the connection really runs MPTCP, 0 after a fallback to TCP.
    # `what`: SAMPLE_STATUS at connect (its initial subflow is established: one, without
    # asking), else SAMPLE_PATHS: the established subflows, and with path_stats every
    # subflow's counters in the same MPTCP_FULL_INFO call (periodically, at the MPTCP
    # peer's EOF, at the second EOF, and in finish() unless that came right after it).
    cdef int val = 0, n
    cdef c.socklen_t vlen = sizeof(val)
    cdef c.mptcp_info info
    cdef c.socklen_t ilen = sizeof(info)
    if p.mptcp_side < 0 or p.connecting:
        return
    cdef int fd = p.side[p.mptcp_side].fd
    if c.getsockopt(fd, c.IPPROTO_TCP, c.TCP_IS_MPTCP, &val, &vlen) != 0 or val == 0:
        return
    p.is_mptcp = 1
    if what == SAMPLE_STATUS:
        if p.subflows < 1:
            p.subflows = 1
        return
    n = sample_paths(w, p, fd) if w.path_stats else established_subflows(fd)
    if n < 0 and c.getsockopt(fd, c.SOL_MPTCP, c.MPTCP_INFO, &info, &ilen) == 0 and ilen >= 1:
        n = info.mptcpi_subflows + 1  # an older kernel: joins under way are counted too
    if n > p.subflows:
        p.subflows = n


cdef void set_rst(int fd) noexcept nogil:
    # SO_LINGER {1, 0}: close() sends RST instead of FIN (an abortive close).
    cdef c.linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    c.setsockopt(fd, c.SOL_SOCKET, c.SO_LINGER, &lg, sizeof(lg))


cdef inline int holds_bytes(Pair *p) noexcept nogil:
    # Bytes read from one peer and not yet delivered to the other (a buffer or a pipe).
    return (p.half[0].len > 0 or p.half[1].len > 0
            or p.half[0].inpipe > 0 or p.half[1].inpipe > 0)


cdef void finish(WorkerState *w, Pair *p, int reason, int err) noexcept nogil:
    cdef int i
    cdef Done *d
    cdef c.epoll_event ev
    if p.dead:
        return
    if reason == R_FAILED:
        # Never connected: no MPTCP status, no bytes, whatever the upstream socket says.
        p.is_mptcp = 0
        p.subflows = 0
    else:
        if reason != R_CLOSED:
            # The last sample, before close(). A clean close comes from pump() right after
            # the second EOF, whose sample (half_eof) is this one: nothing moved since.
            sample_mptcp(w, p, SAMPLE_PATHS)
        paths_closed(p.ps)
    if (reason == R_RESET or reason == R_ERROR or reason == R_ABORTED
            or (reason == R_TIMEOUT and holds_bytes(p))):
        # Pass an abortive close on as an abortive close: the peers learn the stream is cut
        # (a FIN would tell the receiver of undelivered bytes that it had them all).
        set_rst(p.side[0].fd)
        set_rst(p.side[1].fd)
    release_held(w, p)
    for i in range(2):
        if p.side[i].fd >= 0:
            # Out of the epoll set before close(): the open file can outlive this fd (a dup,
            # a child between fork and exec), and its events would point at freed memory.
            c.epoll_ctl(w.epfd, c.EPOLL_CTL_DEL, p.side[i].fd, &ev)
            c.close(p.side[i].fd)
            p.side[i].fd = -1
        pool_put(w, p.half[i].buf)
        p.half[i].buf = NULL
        end_splice(w, &p.half[i], 0)
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
    # Read by the control thread (active = total - finished): published with release order.
    c.__atomic_store_n(&w.finished, w.finished + 1, c.__ATOMIC_RELEASE)
    d = put_done(w, reason, err)
    if d == NULL:
        free(p.ps)
        p.ps = NULL
        count_open(w, p.tag, -1)
        return  # the pair is closed; only its report is lost under memory exhaustion
    d.conn_id = p.conn_id
    d.tag = p.tag
    d.bytes_ab = p.half[0].nbytes
    d.bytes_ba = p.half[1].nbytes
    d.duration_ns = now_ns() - p.start_ns
    d.is_mptcp = p.is_mptcp
    d.subflows = p.subflows
    d.client_family = p.client_family
    d.client_port = p.client_port
    memcpy(d.client_addr, p.client_addr, 16)
    d.ps = p.ps  # the report owns it now
    p.ps = NULL
    c.pthread_mutex_unlock(&w.out_lock)
    # After its report is in the outbox: once open_pairs(tag) reads 0, the next collect()
    # has every Result of that tag (the control plane forgets a retired listener then).
    count_open(w, p.tag, -1)


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
    if w.ps_pool == NULL and w.ps_returned != NULL:
        w.ps_pool = w.ps_returned  # the spare PathSets take() gave back
        w.ps_returned = NULL
    d = &w.done[w.ndone]
    w.ndone += 1
    memset(d, 0, sizeof(Done))
    d.reason = reason
    d.err = err
    w.notify_pending = 1
    return d


cdef inline void fail(WorkerState *w, Pair *p, int err) noexcept nogil:
    finish(w, p, R_RESET if err == c.ECONNRESET or err == c.EPIPE else R_ERROR, err)


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
            sample_mptcp(w, p, SAMPLE_STATUS)
        p = nxt
    sync_listener(w)


cdef int register(WorkerState *w, Pair *p) noexcept nogil:
    # Into the epoll set, once, never modified: edge-triggered readiness is kept in Side.
    # The pair is already on w.pairs; on failure it is finished (returns -1).
    cdef c.epoll_event ev
    cdef int i
    p.last_ns = w.now
    # The first periodic sample a quarter second in, not a second: the joins of a new
    # connection are made by then, and a subflow removed before any sample listed it
    # would show only in the connection's totals.
    p.sampled_ns = w.now - NS + NS // 4
    for i in range(2):
        ev.events = c.EPOLLIN | c.EPOLLOUT | c.EPOLLRDHUP | c.EPOLLET
        ev.data.ptr = &p.side[i]
        if c.epoll_ctl(w.epfd, c.EPOLL_CTL_ADD, p.side[i].fd, &ev) != 0:
            finish(w, p, R_ERROR, c.errno)
            return -1
    return 0


cdef void abort_all(WorkerState *w) noexcept nogil:
    take_incoming(w)
    cdef int i
    while w.pairs != NULL:
        if w.pairs.connecting:  # its upstream never answered: a connect that was cut short
            finish(w, w.pairs, R_FAILED, c.ECANCELED)
        else:
            finish(w, w.pairs, R_ABORTED, 0)
    c.pthread_mutex_lock(&w.lock)
    for i in range(w.nlisteners):
        w.listeners[i].want = 0
    c.pthread_mutex_unlock(&w.lock)
    sync_listener(w)


cdef void scan(WorkerState *w) noexcept nogil:
    # Idle timeouts, and the MPTCP status of busy pairs once a second: subflows come and
    # go during a connection, and after a reset the kernel has already dropped them.
    cdef Pair *p = w.pairs
    cdef Pair *nxt
    while p != NULL:
        nxt = p.next
        if p.held != NULL:
            retry_held(w, p)
        elif p.connecting:
            if w.now - p.start_ns >= p.connect_ns:
                finish(w, p, R_FAILED, c.ETIMEDOUT)
        elif p.idle_ns > 0 and w.now - p.last_ns >= p.idle_ns:
            finish(w, p, R_TIMEOUT, 0)
        elif p.mptcp_side >= 0 and p.last_ns > p.sampled_ns and w.now - p.sampled_ns >= NS:
            sample_mptcp(w, p, SAMPLE_PATHS)
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
    cdef c.sigset_t pipe_sig
    # splice() into a socket whose peer is gone raises SIGPIPE (it has no MSG_NOSIGNAL):
    # blocked in this thread, it stays pending instead of killing an embedding process.
    c.sigemptyset(&pipe_sig)
    c.sigaddset(&pipe_sig, c.SIGPIPE)
    c.sigprocmask(c.SIG_BLOCK, &pipe_sig, NULL)
    cdef uint64_t one = 1
    cdef c.epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout
    cdef Side *s
    cdef Pair *p
    cdef Pair *q
    cdef uint32_t ev
    cdef int soerr
    cdef c.socklen_t slen
    cdef Listener *l
    while True:
        if w.ready != NULL or w.now - w.last_event < w.busy_ns:
            timeout = 0  # more to do, or busy polling: the next event is handled unslept
        elif w.pairs != NULL or w.paused:
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
            if (events[i].data.ptr >= <void *>&w.listeners[0]
                    and events[i].data.ptr < <void *>&w.listeners[MAX_LISTENERS]):
                l = <Listener *>events[i].data.ptr
                if l.listening:  # not let go of earlier in this batch
                    accept_some(w, l)
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
        if w.now >= w.next_pub or (w.pairs == NULL and w.pub.nconns > 0):
            publish(w)  # for connections(): every second, and once the last pair ended
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


# Per-path accounting, the byte pump (recv/send, or splice through a pipe), accept +
# connect in the worker, and the Python-facing classes.
include "relay/_relay_paths.pxi"
include "relay/_relay_pathlist.pxi"
include "relay/_relay_pump.pxi"
include "relay/_relay_accept.pxi"
include "relay/_relay_api.pxi"
