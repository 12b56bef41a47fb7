# Included by _relay.pyx: moving the bytes of one pair, by recv()/send() through the
# worker's scratch buffer, or by splice() through a pipe for bulk (Relay(splice=True)).

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


cdef int start_splice(WorkerState *w, Half *hf) noexcept nogil:
    # The half starts splicing, with an empty pipe; -1 (it copies) when there is none.
    if w.npipes > 0:
        w.npipes -= 1
        hf.pipe[0] = w.pipes[2 * w.npipes]
        hf.pipe[1] = w.pipes[2 * w.npipes + 1]
    else:
        if c.pipe2(hf.pipe, c.O_NONBLOCK | c.O_CLOEXEC) != 0:
            return -1
        # As large as a read, if the kernel allows it (else the default 64 KiB).
        c.syscall(c.SYS_fcntl, hf.pipe[1], c.F_SETPIPE_SZ, <int>w.bufsize)
    hf.splicing = 1
    hf.inpipe = 0
    return 0


cdef void end_splice(WorkerState *w, Half *hf, int state) noexcept nogil:
    # The half stops splicing (state 0: until the next bulk; -1: for good). An empty pipe
    # goes back to the pool; one still holding bytes is closed with them.
    if hf.splicing == 1:
        if hf.inpipe == 0 and w.npipes < POOL_KEEP:
            w.pipes[2 * w.npipes] = hf.pipe[0]
            w.pipes[2 * w.npipes + 1] = hf.pipe[1]
            w.npipes += 1
        else:
            c.close(hf.pipe[0])
            c.close(hf.pipe[1])
    hf.splicing = state
    hf.inpipe = 0


cdef inline ssize_t send_some(int fd, const char *buf, size_t n) noexcept nogil:
    # send() that retries EINTR: taken for EAGAIN, it left the half waiting for an EPOLLOUT
    # edge that had already come, and the pair stalled.
    cdef ssize_t s
    while True:
        s = c.send(fd, buf, n, c.MSG_NOSIGNAL | c.MSG_DONTWAIT)
        if s >= 0 or c.errno != c.EINTR:
            return s


cdef inline ssize_t splice_out(int pipe_rd, int fd, size_t n) noexcept nogil:
    # splice() from a pipe to the destination, retrying EINTR (as send_some).
    cdef ssize_t s
    while True:
        s = c.splice(pipe_rd, NULL, fd, NULL, n, c.SPLICE_F_MOVE | c.SPLICE_F_NONBLOCK)
        if s >= 0 or c.errno != c.EINTR:
            return s


cdef inline int flushed(WorkerState *w, Pair *p, int h, ssize_t n, int err,
                        size_t *pending) noexcept nogil:
    # The outcome of send() or splice() of bytes pending for side 1 - h, `n` as it
    # returned: 1 when none are left, 0 when the destination is full (wait for
    # EPOLLOUT), -1 when the pair was closed.
    if n < 0:
        if err == c.EAGAIN:
            p.side[1 - h].writable = 0
            return 0
        fail(w, p, err)
        return -1
    moved_on(w, p, h, n)  # a slow reader draining what is pending is not idle
    pending[0] -= n
    if pending[0] > 0:
        p.side[1 - h].writable = 0  # a short send: the destination is full
        return 0
    return 1


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


cdef void half_eof(WorkerState *w, Pair *p, int h) noexcept nogil:
    # EOF from side h: nothing is pending for the other side, so half-close it now.
    # A sample at the MPTCP peer's DATA_FIN (all it sent has arrived in order) and at the
    # second EOF (all has moved both ways), while the kernel still lists the subflows:
    # after both DATA_FINs it may drop them. At the other peer's EOF while the MPTCP peer
    # still sends, only a pair that has path data (it lived past the scan's first sample,
    # or publish() sampled it): if a reset ends it next (iperf3's server does that), the
    # kernel's per-subflow counts are gone and the last sample is what is left; most short
    # pairs have none, and their next sample comes at the latest at the second EOF.
    if p.mptcp_side >= 0 and (h == p.mptcp_side or p.half[p.mptcp_side].done
                              or p.ps != NULL):
        sample_mptcp(w, p, SAMPLE_PATHS)
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
    cdef int err, rc
    while True:
        if hf.inpipe > 0:
            if not dst.writable:
                return 0
            n = splice_out(hf.pipe[0], dst.fd, hf.inpipe)
            rc = flushed(w, p, h, n, c.errno, &hf.inpipe)
            if rc <= 0:
                return rc
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
            half_eof(w, p, h)
            break
        elif err == c.EAGAIN:
            src.readable = 0
            break
        elif err == c.EINVAL or err == c.ENOSYS:
            end_splice(w, hf, -1)  # nothing was moved: copy this half from now on
            return 1
        elif err != c.EINTR:
            fail(w, p, err)
            return -1
    # The pipe is empty here. A turn that moved little ends the bulk: copy again (a short
    # recv() saves the call that only says EAGAIN) and give the pipe back.
    if moved < SPLICE_MIN or hf.done:
        end_splice(w, hf, 0)
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
        s = send_some(dst.fd, hf.buf + hf.off, hf.len)
        if s > 0:
            hf.off += s
        rc = flushed(w, p, h, s, c.errno, &hf.len)
        if rc <= 0:
            return rc
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
                s = send_some(dst.fd, w.scratch, n)
                err = c.errno
                if s < 0:
                    if err != c.EAGAIN:
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
            if <size_t>n >= SPLICE_MIN and p.splice and hf.splicing == 0 \
                    and start_splice(w, hf) == 0:
                # Bulk: splice the rest of this burst and what follows.
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
            half_eof(w, p, h)
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
