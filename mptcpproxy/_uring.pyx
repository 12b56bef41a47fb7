# An experimental relay engine on io_uring (issue 16's last lever), built as
# mptcpproxy.relay._uring when the compiler allows it. One ring per worker thread, the
# whole loop inside `with nogil`: an accept on the shared listener (single-shot by default:
# a multishot one stays first in the listener's queue and gets every client), an upstream
# socket connected through the ring, then each direction as recv (a buffer picked by the
# kernel from the worker's provided-buffer ring) -> send linked to the next recv, so one
# io_uring_enter() carries a direction's send and its next receive. EOF: shutdown(SHUT_WR)
# of the other side; both directions done: close both; an error: cancel what is pending,
# then close both. Raw system calls only (mptcpproxy/relay/_uring_sys.pxd).
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED
from posix.mman cimport PROT_READ, PROT_WRITE, mmap, munmap

from mptcpproxy.relay cimport _sys as c
from mptcpproxy.relay._uring_sys cimport *

import os
import socket
import struct
import threading

cdef enum:
    SQ_ENTRIES = 1024
    CQ_ENTRIES = 8192
    SMALL = 0       # the buffer groups: many small buffers, for every recv at first,
    BIG = 1         # and a few big ones (hot in the cache) for a direction filling them
    MSG_WAITALL = 0x100
    IPPROTO_MPTCP = 262
    # the low 3 bits of user_data: what completed; the rest: the pair (NULL: the worker)
    T_ACCEPT = 1
    T_STOP = 2
    T_IGNORE = 3
    T_CONNECT = 1
    T_RECV = 2      # + direction
    T_SEND = 4      # + direction
    RESULTS_MAX = 65536
    # why a pair ended (Uring.results())
    R_CLOSED = 0    # both directions saw EOF
    R_FAILED = 1    # the upstream connect failed
    R_ERROR = 2     # a recv or send failed
    R_STOPPED = 3   # cancelled by stop()


cdef struct Pair:
    int fd[2]            # 0: the accepted client, 1: the upstream
    int refs             # submitted operations whose completion is still to come
    int done[2]          # direction d (fd[d] -> fd[1-d]) saw its EOF
    int failed           # an error, or stop(): pending operations cancelled
    int reason, err
    int bid[2]           # the buffer direction d is sending, -1: none
    int group[2]         # the buffer group of direction d's next (or pending) recv
    int sgroup[2]        # and of the buffer it is sending
    int starved[2]       # waiting for a free buffer (the recv met -ENOBUFS)
    uint64_t nbytes[2]
    Pair *prev
    Pair *next
    Pair *starved_next[2]


cdef struct Record:
    uint64_t up, down
    int32_t reason, err


cdef struct sockaddr_any:
    char raw[128]


cdef struct Pool:
    ur_buf *ring         # a provided-buffer ring (group SMALL or BIG)
    char *mem            # its buffers
    uint32_t count, size
    uint16_t tail


cdef struct Worker:
    int ring, lfd, efd, family, proto, stopping, accepting, multishot_accept
    ur_sqe *sqes
    uint32_t *sq_head
    uint32_t *sq_tail
    uint32_t *sq_array
    uint32_t sq_mask, sq_entries, sq_local, sq_flushed
    uint32_t *cq_head
    uint32_t *cq_tail
    ur_cqe *cqes
    uint32_t cq_mask
    void *sq_map
    void *cq_map
    size_t sq_map_len, cq_map_len, sqes_len
    Pool pool[2]
    uint32_t recycled
    sockaddr_any upstream
    uint32_t upstream_len
    uint64_t efd_value
    Pair *live
    Pair *starved_head[2]
    uint64_t accepted, finished, enters, starved
    c.pthread_mutex_t lock
    Record *records
    uint32_t nrecords, dropped


cdef ur_sqe *get_sqe(Worker *w) noexcept nogil:
    # The next free submission entry; when the ring is full, hand it to the kernel first.
    cdef ur_sqe *sqe
    if w.sq_local - ur_load(w.sq_head) >= w.sq_entries:
        flush(w, 0)
    sqe = &w.sqes[w.sq_local & w.sq_mask]
    memset(sqe, 0, sizeof(ur_sqe))
    w.sq_local += 1
    return sqe


cdef int flush(Worker *w, unsigned wait) noexcept nogil:
    cdef uint32_t n = w.sq_local - w.sq_flushed
    cdef int ret
    ur_store(w.sq_tail, w.sq_local)
    while True:
        w.enters += 1
        ret = ur_enter(w.ring, n, wait, UR_ENTER_GETEVENTS if wait or n == 0 else 0)
        if ret >= 0:
            w.sq_flushed += <uint32_t>ret
            return 0
        if c.errno == c.EINTR:
            continue
        return -c.errno  # EBUSY/EAGAIN: completions to reap first; the caller loops


cdef inline char *buffer(Worker *w, int g, int bid) noexcept nogil:
    return w.pool[g].mem + <size_t>bid * w.pool[g].size


cdef inline void recycle(Worker *w, int g, int bid) noexcept nogil:
    cdef Pool *pool = &w.pool[g]
    cdef ur_buf *b = &pool.ring[pool.tail & (pool.count - 1)]
    b.addr = <uint64_t>buffer(w, g, bid)
    b.len = pool.size
    b.bid = <uint16_t>bid
    pool.tail += 1
    w.recycled += 1
    # the ring's tail is the 16 bits at offset 14 of its first entry
    ur_store16(<uint16_t *>(<char *>pool.ring + 14), pool.tail)


cdef void post_recv(Worker *w, Pair *p, int d) noexcept nogil:
    cdef ur_sqe *sqe = get_sqe(w)
    sqe.opcode = UR_OP_RECV
    sqe.fd = p.fd[d]
    sqe.flags = UR_SQE_BUFFER_SELECT
    sqe.buf_group = p.group[d]
    sqe.user_data = <uint64_t>p | (T_RECV + d)
    p.refs += 1


cdef void post_cancel(Worker *w, int fd) noexcept nogil:
    cdef ur_sqe *sqe = get_sqe(w)
    sqe.opcode = UR_OP_ASYNC_CANCEL
    sqe.fd = fd
    sqe.op_flags = UR_CANCEL_FD | UR_CANCEL_ALL
    sqe.user_data = T_IGNORE


cdef void post_close(Worker *w, int fd) noexcept nogil:
    # close() in the next io_uring_enter instead of a system call of its own (a socket has
    # no flush, so the ring closes it inline); a completion only if it fails
    cdef ur_sqe *sqe = get_sqe(w)
    sqe.opcode = UR_OP_CLOSE
    sqe.fd = fd
    sqe.flags = UR_SQE_CQE_SKIP_SUCCESS
    sqe.user_data = T_IGNORE


cdef void post_accept(Worker *w) noexcept nogil:
    cdef ur_sqe *sqe = get_sqe(w)
    sqe.opcode = UR_OP_ACCEPT
    sqe.fd = w.lfd
    sqe.ioprio = UR_ACCEPT_MULTISHOT if w.multishot_accept else 0
    sqe.op_flags = c.SOCK_CLOEXEC
    sqe.user_data = T_ACCEPT
    w.accepting = 1


cdef void fail(Worker *w, Pair *p, int reason, int err) noexcept nogil:
    if p.failed:
        return
    p.failed = 1
    p.reason, p.err = reason, err
    if p.refs:
        post_cancel(w, p.fd[0])
        if p.fd[1] >= 0:
            post_cancel(w, p.fd[1])


cdef void settle(Worker *w, Pair *p) noexcept nogil:
    # Close the pair once nothing of it is pending and it failed or both directions ended.
    cdef Record *r
    if p.refs or p.starved[0] or p.starved[1] or not (p.failed or (p.done[0] and p.done[1])):
        return
    post_close(w, p.fd[0])
    if p.fd[1] >= 0:
        post_close(w, p.fd[1])
    if p.prev:
        p.prev.next = p.next
    else:
        w.live = p.next
    if p.next:
        p.next.prev = p.prev
    c.pthread_mutex_lock(&w.lock)
    if w.nrecords < RESULTS_MAX:
        r = &w.records[w.nrecords]
        r.up, r.down = p.nbytes[0], p.nbytes[1]
        r.reason, r.err = (p.reason if p.failed else R_CLOSED), p.err
        w.nrecords += 1
    else:
        w.dropped += 1
    w.finished += 1
    c.pthread_mutex_unlock(&w.lock)
    free(p)


cdef void on_accept(Worker *w, int fd) noexcept nogil:
    cdef int one = 1
    cdef ur_sqe *sqe
    cdef Pair *p = <Pair *>calloc(1, sizeof(Pair))
    if p == NULL:
        c.close(fd)
        return
    w.accepted += 1
    p.fd[0], p.bid[0], p.bid[1] = fd, -1, -1
    p.next = w.live
    if w.live:
        w.live.prev = p
    w.live = p
    p.fd[1] = c.socket(w.family, c.SOCK_STREAM | c.SOCK_CLOEXEC, w.proto)
    if p.fd[1] < 0:
        fail(w, p, R_FAILED, c.errno)
        settle(w, p)
        return
    c.setsockopt(p.fd[1], c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))
    sqe = get_sqe(w)
    sqe.opcode = UR_OP_CONNECT
    sqe.fd = p.fd[1]
    sqe.addr = <uint64_t>&w.upstream
    sqe.off = w.upstream_len
    sqe.user_data = <uint64_t>p | T_CONNECT
    p.refs += 1


cdef void on_recv(Worker *w, Pair *p, int d, int res, uint32_t flags) noexcept nogil:
    cdef ur_sqe *sqe
    cdef int bid, g = p.group[d]
    if p.bid[d] >= 0:
        # this recv was linked behind a send, which succeeded (a failed one cancels its
        # link without a completion): its buffer is free again
        recycle(w, p.sgroup[d], p.bid[d])
        p.bid[d] = -1
    if res > 0:
        bid = flags >> UR_CQE_BUFFER_SHIFT
        p.nbytes[d] += res
        if p.failed:
            recycle(w, g, bid)
            return
        p.bid[d], p.sgroup[d] = bid, g
        # a direction that fills a small buffer moves to the big ones, and back when a
        # big one gets no more than a small one holds
        if w.pool[BIG].count:
            p.group[d] = BIG if <uint32_t>res >= w.pool[SMALL].size else SMALL
        sqe = get_sqe(w)
        sqe.opcode = UR_OP_SEND
        sqe.fd = p.fd[1 - d]
        sqe.addr = <uint64_t>buffer(w, g, bid)
        sqe.len = res
        # all of it or a failure (MSG_WAITALL); the next recv starts once it is complete;
        # no completion when it succeeds: one io_uring_enter per event, not two
        sqe.op_flags = c.MSG_NOSIGNAL | MSG_WAITALL
        sqe.flags = UR_SQE_IO_LINK | UR_SQE_CQE_SKIP_SUCCESS
        sqe.user_data = <uint64_t>p | (T_SEND + d)
        post_recv(w, p, d)
    elif res == 0:
        p.done[d] = 1
        # the other direction ended already: the close right after sends the same FIN
        if not p.failed and not p.done[1 - d]:
            c.shutdown(p.fd[1 - d], c.SHUT_WR)
    elif res == -c.ENOBUFS and g == BIG and not p.failed:
        p.group[d] = SMALL  # the big buffers are all being sent: a small one will do
        post_recv(w, p, d)
    elif res == -c.ENOBUFS and not p.failed:
        p.starved[d] = 1  # every buffer is being sent: retried when one comes back
        w.starved += 1
        p.starved_next[d] = w.starved_head[d]
        w.starved_head[d] = p
    elif res != -c.ECANCELED:
        fail(w, p, R_ERROR, -res)


cdef void on_send(Worker *w, Pair *p, int d, int res) noexcept nogil:
    # Only a failed (or short) send completes (IOSQE_CQE_SKIP_SUCCESS); the kernel then
    # cancels the recv linked behind it without a completion (REQ_F_SKIP_LINK_CQES): that
    # recv is over, and the buffer is free.
    recycle(w, p.sgroup[d], p.bid[d])
    p.bid[d] = -1
    p.refs -= 1
    fail(w, p, R_ERROR, -res if res < 0 else c.EPIPE)


cdef void feed_starved(Worker *w) noexcept nogil:
    # Directions that found no buffer try again (after buffers came back).
    cdef Pair *p
    cdef int d
    for d in range(2):
        while w.starved_head[d] != NULL:
            p = w.starved_head[d]
            w.starved_head[d] = p.starved_next[d]
            p.starved[d] = 0
            if p.failed:
                settle(w, p)
            else:
                post_recv(w, p, d)


cdef void on_cqe(Worker *w, ur_cqe *cqe) noexcept nogil:
    cdef uint64_t tag = cqe.user_data & 7
    cdef Pair *p = <Pair *>(cqe.user_data & ~(<uint64_t>7))
    cdef int res = cqe.res
    if p == NULL:
        if tag == T_ACCEPT:
            if res >= 0:
                if w.stopping:
                    c.close(res)
                else:
                    on_accept(w, res)
            if not (cqe.flags & UR_CQE_F_MORE):
                w.accepting = 0
                if not w.stopping:
                    post_accept(w)
        elif tag == T_STOP:
            w.stopping = 1
            if w.accepting:
                post_cancel(w, w.lfd)
            p = w.live
            while p != NULL:
                fail(w, p, R_STOPPED, c.ECANCELED)
                p = p.next
        return
    if tag < T_SEND:
        p.refs -= 1  # a send is counted by the recv linked behind it (on_send)
    if tag == T_CONNECT:
        if res < 0:
            fail(w, p, R_FAILED, -res)
        elif not p.failed:
            post_recv(w, p, 0)
            post_recv(w, p, 1)
    elif tag == T_RECV or tag == T_RECV + 1:
        on_recv(w, p, <int>(tag - T_RECV), res, cqe.flags)
    else:
        on_send(w, p, <int>(tag - T_SEND), res)
    if p.failed and p.refs:
        # a recv linked behind a send is issued only when the send completes: what an
        # earlier cancel could not reach yet, this one does
        post_cancel(w, p.fd[0])
        if p.fd[1] >= 0:
            post_cancel(w, p.fd[1])
    settle(w, p)


cdef int loop(Worker *w) noexcept nogil:
    cdef uint32_t head, tail
    cdef ur_sqe *sqe
    cdef int ret
    post_accept(w)
    sqe = get_sqe(w)
    sqe.opcode = UR_OP_READ
    sqe.fd = w.efd
    sqe.addr = <uint64_t>&w.efd_value
    sqe.len = 8
    sqe.user_data = T_STOP
    while not (w.stopping and w.live == NULL and not w.accepting):
        ret = flush(w, 1)
        if ret < 0 and ret != -EBUSY and ret != -c.EAGAIN:
            return ret
        head = w.cq_head[0]
        tail = ur_load(w.cq_tail)
        while head != tail:
            on_cqe(w, &w.cqes[head & w.cq_mask])
            head += 1
            ur_store(w.cq_head, head)
            if head == tail:
                tail = ur_load(w.cq_tail)
        if (w.starved_head[0] != NULL or w.starved_head[1] != NULL) and (
                w.recycled or w.stopping):
            feed_starved(w)
        w.recycled = 0
    return flush(w, 0)  # the last pairs' closes


include "relay/_uring_ring.pxi"
include "relay/_uring_api.pxi"
