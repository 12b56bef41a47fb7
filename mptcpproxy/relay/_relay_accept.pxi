# Included by _relay.pyx: accept() and the upstream connect() inside the worker, the fast
# path for a fixed upstream address (Relay.listen). The control plane keeps everything
# that needs a decision per connection (transparent mode, names to resolve, limits).

cdef uint64_t next_conn_id = 1  # shared by every relay in the process, taken atomically


cdef inline uint64_t new_conn_id() noexcept nogil:
    return c.__atomic_fetch_add(&next_conn_id, 1, c.__ATOMIC_RELAXED)


cdef void sync_one(WorkerState *w, Listener *l) noexcept nogil:
    # Make the epoll set hold this listener exactly when the control plane wants it and
    # accepting is not paused. EPOLLEXCLUSIVE: one worker is woken per new connection.
    # Called with the worker's lock held.
    cdef c.epoll_event ev
    if l.dirty:
        l.cfg = l.next
        l.dirty = 0
    if l.want and not l.listening and w.now >= l.resume_ns:
        ev.events = c.EPOLLIN | c.EPOLLEXCLUSIVE
        ev.data.ptr = <void *>l
        if c.epoll_ctl(w.epfd, c.EPOLL_CTL_ADD, l.fd, &ev) == 0:
            l.listening = 1
    elif l.listening and (not l.want or w.now < l.resume_ns):
        ev.events = 0
        c.epoll_ctl(w.epfd, c.EPOLL_CTL_DEL, l.fd, &ev)
        l.listening = 0
    if not l.want and not l.listening:
        l.fd = -1  # let go: the control plane may close the socket once every worker has


cdef int sync_listener(WorkerState *w) noexcept nogil:
    # Every listener slot in step with the control plane's wishes; returns 1 while a
    # wanted listener is paused (the worker then wakes up to resume it).
    cdef int i, paused = 0
    cdef Listener *l
    c.pthread_mutex_lock(&w.lock)
    for i in range(w.nlisteners):
        l = &w.listeners[i]
        if l.fd >= 0:
            sync_one(w, l)
            if l.want and not l.listening:
                paused = 1
    while w.nlisteners > 0 and w.listeners[w.nlisteners - 1].fd < 0:
        w.nlisteners -= 1
    c.pthread_mutex_unlock(&w.lock)
    w.paused = paused
    return paused


cdef inline void pause_accepting(WorkerState *w, Listener *l) noexcept nogil:
    # Out of fds or memory: leave the listener alone for 100 ms, not spin on it.
    w.accept_errors += 1
    l.resume_ns = w.now + NS // 10
    sync_listener(w)


cdef inline void count_open(WorkerState *w, uint32_t tag, int64_t delta) noexcept nogil:
    c.__atomic_fetch_add_i64(&w.open_by_tag[tag], delta, c.__ATOMIC_RELEASE)


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


cdef void accept_some(WorkerState *w, Listener *l) noexcept nogil:
    cdef c.sockaddr_storage ss
    cdef c.socklen_t sslen
    cdef int cfd, err, i, rc
    cdef Pair *p
    cdef Done *d
    cdef ListenCfg *cfg = &l.cfg
    for i in range(ACCEPT_BATCH):
        if w.nheld > 0:  # the fds that come free go to the clients already held first
            pause_accepting(w, l)
            return
        sslen = sizeof(ss)
        cfd = c.accept4(l.fd, <c.sockaddr *>&ss, &sslen, c.SOCK_NONBLOCK | c.SOCK_CLOEXEC)
        if cfd < 0:
            err = c.errno
            if err == c.EMFILE or err == c.ENFILE or err == c.ENOBUFS or err == c.ENOMEM:
                pause_accepting(w, l)
                d = put_done(w, R_ACCEPT_ERROR, err)
                if d != NULL:
                    d.tag = cfg.tag  # counted for its listener
                    c.pthread_mutex_unlock(&w.out_lock)
                return
            if err == c.EAGAIN:
                return
            continue  # ECONNABORTED and the like: that client is gone already
        w.accepted += 1
        c.__atomic_fetch_add_i64(&w.accepted_by_tag[cfg.tag], 1, c.__ATOMIC_RELAXED)
        p = <Pair *>calloc(1, sizeof(Pair))
        if p == NULL:
            c.close(cfd)
            continue
        p.side[0].fd = cfd
        p.side[1].fd = -1
        p.side[0].pair = p
        p.side[1].pair = p
        p.conn_id = new_conn_id()
        p.mptcp_side = cfg.up_mptcp_side
        p.tag = cfg.tag
        p.idle_ns = cfg.idle_ns
        p.connect_ns = cfg.connect_ns
        p.splice = cfg.splice
        p.start_ns = now_ns()
        keep_client_address(p, &ss)
        addr_from_sockaddr(&p.upstream, <uint8_t *>&cfg.up_addr)
        c.pthread_mutex_lock(&w.lock)
        c.__atomic_fetch_add(&w.total, 1, c.__ATOMIC_RELEASE)
        c.pthread_mutex_unlock(&w.lock)
        count_open(w, p.tag, 1)
        p.next = w.pairs
        if w.pairs != NULL:
            w.pairs.prev = p
        w.pairs = p
        rc = connect_upstream(w, p, cfg)
        if rc == 1:
            # No fd for the upstream: the client is held (scan() tries again) and no other
            # is accepted until it has one; clients beyond wait in the backlog.
            p.held = <ListenCfg *>malloc(sizeof(ListenCfg))
            if p.held == NULL:
                finish(w, p, R_FAILED, c.ENOMEM)
            else:
                p.held[0] = cfg[0]
                p.connecting = 1  # for a stop meanwhile: a connect cut short
                w.nheld += 1
            pause_accepting(w, l)
            return


cdef int connect_upstream(WorkerState *w, Pair *p, ListenCfg *cfg) noexcept nogil:
    # Open the upstream socket and start connecting: 0 under way (or failed: the pair is
    # finished), 1 when there is no fd or memory for the socket (the pair is untouched).
    cdef int ufd, err, rc
    cdef int one = 1
    ufd = c.socket(cfg.up_family, c.SOCK_STREAM | c.SOCK_NONBLOCK | c.SOCK_CLOEXEC,
                   cfg.up_proto)
    if ufd < 0:
        err = c.errno
        if err == c.EMFILE or err == c.ENFILE or err == c.ENOBUFS or err == c.ENOMEM:
            return 1
        finish(w, p, R_FAILED, err)
        return 0
    p.side[1].fd = ufd
    if cfg.mark:
        c.setsockopt(ufd, c.SOL_SOCKET, c.SO_MARK, &cfg.mark, sizeof(cfg.mark))
    # A relay must not add Nagle's delay on top of the application's own choice (the
    # client's socket has TCP_NODELAY from the listener, see Relay.listen).
    c.setsockopt(ufd, c.IPPROTO_TCP, c.TCP_NODELAY, &one, sizeof(one))
    rc = c.connect(ufd, <c.sockaddr *>&cfg.up_addr, cfg.up_len)
    err = c.errno
    if rc != 0 and err != c.EINPROGRESS:
        finish(w, p, R_FAILED, err)
        return 0
    p.connecting = 1  # even when connect() is done already: EPOLLOUT follows at once
    register(w, p)
    return 0


cdef void retry_held(WorkerState *w, Pair *p) noexcept nogil:
    # A held client (no fd for its upstream when accepted): try again, within its
    # connect timeout.
    cdef ListenCfg *cfg = p.held
    if w.now - p.start_ns >= p.connect_ns:
        finish(w, p, R_FAILED, c.ETIMEDOUT)
        return
    if connect_upstream(w, p, cfg) == 0:
        release_held(w, p)


cdef void release_held(WorkerState *w, Pair *p) noexcept nogil:
    if p.held != NULL:
        free(p.held)
        p.held = NULL
        w.nheld -= 1


cdef int connect_pending(WorkerState *w, Pair *p, Side *s, uint32_t ev) noexcept nogil:
    # An event on a pair whose upstream is still connecting. Returns 1 while nothing may
    # move yet (the client's readiness is kept in its Side for later), 0 once connected.
    cdef int soerr = 0
    cdef c.socklen_t slen = sizeof(soerr)
    if s == &p.side[0]:
        if ev & c.EPOLLERR:
            c.getsockopt(s.fd, c.SOL_SOCKET, c.SO_ERROR, &soerr, &slen)
            if soerr:
                fail(w, p, soerr)  # the client gave up while we were connecting
        return 1
    if not ev & (c.EPOLLOUT | c.EPOLLERR | c.EPOLLHUP):
        return 1
    if ev & (c.EPOLLERR | c.EPOLLHUP):  # EPOLLOUT alone: connected
        c.getsockopt(s.fd, c.SOL_SOCKET, c.SO_ERROR, &soerr, &slen)
        if soerr:
            finish(w, p, R_FAILED, soerr)
            return 1
    p.connecting = 0
    sample_mptcp(w, p, SAMPLE_STATUS)
    return 0
