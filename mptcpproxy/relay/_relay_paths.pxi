# Included by _relay.pyx: per-path accounting (Relay(path_stats=True)). One
# MPTCP_FULL_INFO call per sample gives every subflow's id, addresses and tcp_info and the
# connection's totals; the last sample per subflow id is kept in the pair's PathSet, the
# increments are counted per local address, and each worker publishes its open pairs for
# Relay.connections(). See docs/design.md "Per-path accounting".

# Upper bounds of the path RTT histogram, in microseconds (metrics.PATH_RTT_BUCKETS).
cdef uint32_t rtt_bounds_us[RTT_BOUNDS]
rtt_bounds_us[:] = [500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                    1000000, 2500000]


cdef inline uint64_t grown(uint64_t now, uint64_t before) noexcept nogil:
    # A kernel counter's increment since the last sample (never negative).
    return now - before if now > before else 0


cdef void addr_from_sockaddr(Addr *a, const uint8_t *ss) noexcept nogil:
    # struct sockaddr_storage -> Addr; an IPv4-mapped IPv6 address becomes IPv4.
    cdef uint16_t family
    memcpy(&family, ss, 2)
    memset(a, 0, sizeof(Addr))
    if family == c.AF_INET:
        a.family = c.AF_INET
        memcpy(a.addr, ss + 4, 4)
    elif family == c.AF_INET6:
        if (ss[8] | ss[9] | ss[10] | ss[11] | ss[12] | ss[13] | ss[14] | ss[15] | ss[16]
                | ss[17]) == 0 and ss[18] == 0xff and ss[19] == 0xff:
            a.family = c.AF_INET
            memcpy(a.addr, ss + 20, 4)
        else:
            a.family = c.AF_INET6
            memcpy(a.addr, ss + 8, 16)
    else:
        return
    a.port = (<uint16_t>ss[2] << 8) | ss[3]


cdef void addr_of_peer(Addr *a, int fd) noexcept nogil:
    # The address fd is connected to (family 0 when unknown).
    cdef c.sockaddr_storage ss
    cdef c.socklen_t slen = sizeof(ss)
    memset(a, 0, sizeof(Addr))
    if c.getpeername(fd, <c.sockaddr *>&ss, &slen) == 0:
        addr_from_sockaddr(a, <uint8_t *>&ss)


cdef AddrStat *addr_stat(WorkerState *w, Addr *local) noexcept nogil:
    # The counters of one local address (the last entry, "other", past MAX_ADDRS).
    # Called with pub_lock held.
    cdef int i
    for i in range(w.naddrs):
        if (w.addrs[i].local.family == local.family
                and memcmp(w.addrs[i].local.addr, local.addr, 16) == 0):
            return &w.addrs[i]
    if w.naddrs == MAX_ADDRS or local.family == 0:
        return &w.addrs[MAX_ADDRS]
    i = w.naddrs
    w.naddrs += 1
    memset(&w.addrs[i], 0, sizeof(AddrStat))
    w.addrs[i].local.family = local.family
    memcpy(w.addrs[i].local.addr, local.addr, 16)
    return &w.addrs[i]


cdef inline void observe_rtt(AddrStat *a, uint32_t rtt_us) noexcept nogil:
    cdef int b = 0
    while b < RTT_BOUNDS and rtt_us > rtt_bounds_us[b]:
        b += 1
    a.rtt_count[b] += 1
    a.rtt_sum_us += rtt_us


cdef inline size_t pathset_size(int cap) noexcept nogil:
    return sizeof(PathSet) - (MAX_PATHS - cap) * sizeof(PathRec)


cdef PathSet *new_pathset(int cap) noexcept nogil:
    cdef PathSet *ps = <PathSet *>calloc(1, pathset_size(cap))
    if ps != NULL:
        ps.cap = cap
    return ps


cdef PathSet *pool_pathset(WorkerState *w) noexcept nogil:
    # A zeroed PathSet of SMALL_PATHS records: a spare one take() gave back, or a new one.
    cdef PathSet *ps = w.ps_pool
    if ps == NULL:
        return new_pathset(SMALL_PATHS)
    w.ps_pool = ps.next_free
    memset(ps, 0, pathset_size(SMALL_PATHS))
    ps.cap = SMALL_PATHS
    return ps


cdef void free_pathsets(PathSet *ps) noexcept nogil:
    # A chain of spare PathSets (next_free).
    cdef PathSet *nxt
    while ps != NULL:
        nxt = ps.next_free
        free(ps)
        ps = nxt


cdef int path_slot(PathSet **pps, c.mptcp_subflow_info *sf) noexcept nogil:
    # The record of subflow sf.id: found, new (the set grown if need be: *pps may move), or
    # taking the place of a closed one (whose counts go to `other`); -1 when all
    # MAX_PATHS are open subflows (or no memory to grow).
    cdef int j, cap
    cdef PathRec *r
    cdef PathSet *ps = pps[0]
    for j in range(ps.n):
        if ps.rec[j].id == sf.id:
            return j
    if ps.n == ps.cap and ps.cap < MAX_PATHS:
        cap = ps.cap * 2 if ps.cap * 2 < MAX_PATHS else MAX_PATHS
        ps = <PathSet *>realloc(ps, pathset_size(cap))
        if ps != NULL:
            ps.cap = cap
            pps[0] = ps
        else:
            ps = pps[0]
    if ps.n < ps.cap:
        j = ps.n
        ps.n += 1
    else:
        j = 0
        while j < ps.n and not ps.rec[j].closed:
            j += 1
        if j == ps.n:
            return -1
        ps.other.sent += ps.rec[j].sent
        ps.other.received += ps.rec[j].received
        ps.other.retrans += ps.rec[j].retrans
        ps.other.acked += ps.rec[j].acked
    r = &ps.rec[j]
    memset(r, 0, sizeof(PathRec))
    r.id = sf.id
    addr_from_sockaddr(&r.local, sf.local)
    addr_from_sockaddr(&r.remote, sf.remote)
    return j


cdef void update_paths(WorkerState *w, PathSet **pps, c.mptcp_info *info,
                       c.mptcp_subflow_info *sfi, c.tcp_info_paths *tcpi,
                       uint32_t n) noexcept nogil:
    # Fold one sample into the pair's records (*pps may move as it grows) and the
    # worker's per-address counters.
    cdef PathSet *ps
    cdef int seen[MAX_PATHS]
    cdef int j, vanished = 0, gone = -1, untracked = 0
    cdef uint32_t i
    cdef uint64_t ds, dr, dx, da, listed_acked = 0, listed_received = 0, missed_a, missed_r
    cdef PathRec *r
    cdef AddrStat *a
    memset(seen, 0, sizeof(seen))
    c.pthread_mutex_lock(&w.pub_lock)
    for i in range(n):
        if sfi[i].id == 0:
            continue  # after a reset: one empty entry, the subflows are gone
        j = path_slot(pps, &sfi[i])
        if j < 0:
            untracked = 1
            continue
        r = &pps[0].rec[j]
        seen[j] = 1
        ds = grown(tcpi[i].tcpi_bytes_sent, r.sent)
        dr = grown(tcpi[i].tcpi_bytes_received, r.received)
        dx = grown(tcpi[i].tcpi_bytes_retrans, r.retrans)
        da = grown(tcpi[i].tcpi_bytes_acked, r.acked)
        r.sent += ds
        r.received += dr
        r.retrans += dx
        r.acked += da
        r.rtt_us = tcpi[i].tcpi_rtt
        r.closed = 0
        listed_acked += da
        listed_received += dr
        a = addr_stat(w, &r.local)
        a.sent += da
        a.received += dr
        a.retrans += dx
        if tcpi[i].tcpi_state == 1 and r.rtt_us > 0:  # ESTABLISHED: a current RTT
            observe_rtt(a, r.rtt_us)
    ps = pps[0]
    for j in range(ps.n):
        if not seen[j] and not ps.rec[j].closed:
            ps.rec[j].closed = 1
            vanished += 1
            gone = j
    if vanished > 0 or untracked:
        # What the connection moved that no listed subflow shows: a subflow removed since
        # the last sample took it along. To that one when it is the only one, else to
        # "closed subflows".
        # (acknowledged bytes on both levels: a sent count includes local qdisc drops).
        missed_a = grown(grown(info.mptcpi_bytes_acked, ps.mptcp_acked), listed_acked)
        missed_r = grown(grown(info.mptcpi_bytes_received, ps.mptcp_received), listed_received)
        r = &ps.rec[gone] if vanished == 1 and not untracked else &ps.other
        r.sent += missed_a
        r.acked += missed_a
        r.received += missed_r
        if r.id != 0:
            a = addr_stat(w, &r.local)
            a.sent += missed_a
            a.received += missed_r
    w.reinjected += grown(info.mptcpi_bytes_retrans, ps.mptcp_retrans)
    c.pthread_mutex_unlock(&w.pub_lock)
    # Totals only grow (a reset leaves them in place; a later sample never lowers them).
    if info.mptcpi_bytes_sent > ps.mptcp_sent:
        ps.mptcp_sent = info.mptcpi_bytes_sent
    if info.mptcpi_bytes_received > ps.mptcp_received:
        ps.mptcp_received = info.mptcpi_bytes_received
    if info.mptcpi_bytes_retrans > ps.mptcp_retrans:
        ps.mptcp_retrans = info.mptcpi_bytes_retrans
    if info.mptcpi_bytes_acked > ps.mptcp_acked:
        ps.mptcp_acked = info.mptcpi_bytes_acked


cdef int sample_paths(WorkerState *w, Pair *p, int fd) noexcept nogil:
    # One MPTCP_FULL_INFO call: the established subflows (returned; -1 before Linux 6.5)
    # and, folded into p.ps, every subflow's counters and the connection's totals.
    cdef c.mptcp_full_info mfi
    cdef c.tcp_info_paths tcpi[c.MAX_SUBFLOWS]
    cdef c.mptcp_subflow_info sfi[c.MAX_SUBFLOWS]
    cdef c.socklen_t mlen = sizeof(mfi)
    cdef uint32_t i, n
    cdef int count = 0
    memset(&mfi, 0, sizeof(mfi))
    mfi.size_tcpinfo_user = sizeof(c.tcp_info_paths)
    mfi.size_sfinfo_user = sizeof(c.mptcp_subflow_info)
    mfi.size_arrays_user = c.MAX_SUBFLOWS
    mfi.tcp_info = <uint64_t>&tcpi[0]
    mfi.subflow_info = <uint64_t>&sfi[0]
    if c.getsockopt(fd, c.SOL_MPTCP, c.MPTCP_FULL_INFO, &mfi, &mlen) != 0:
        return -1
    n = mfi.num_subflows if mfi.num_subflows < c.MAX_SUBFLOWS else c.MAX_SUBFLOWS
    for i in range(n):
        if sfi[i].id != 0 and subflow_came_up(tcpi[i].tcpi_state, tcpi[i].tcpi_bytes_acked,
                                              tcpi[i].tcpi_bytes_received):
            count += 1
    if p.ps == NULL:
        p.ps = pool_pathset(w)
        if p.ps == NULL:
            return count  # out of memory: this pair goes without paths
    update_paths(w, &p.ps, &mfi.info, sfi, tcpi, n)
    return count


cdef void paths_closed(PathSet *ps) noexcept nogil:
    # The connection ended: none of its subflows is open any more.
    cdef int j
    if ps != NULL:
        for j in range(ps.n):
            ps.rec[j].closed = 1


cdef inline int has_other(PathSet *ps) noexcept nogil:
    return (ps.other.sent > 0 or ps.other.received > 0 or ps.other.retrans > 0
            or ps.other.acked > 0)


cdef int pub_room(PubBuf *b, int paths) noexcept nogil:
    # Room for one more pair and `paths` more records; -1 when out of memory.
    cdef void *grow
    cdef int cap
    if b.nconns == b.conns_cap:
        cap = b.conns_cap * 2 if b.conns_cap else 64
        grow = realloc(b.conns, cap * sizeof(ConnPub))
        if grow == NULL:
            return -1
        b.conns, b.conns_cap = <ConnPub *>grow, cap
    if b.npaths + paths > b.paths_cap:
        cap = b.paths_cap * 2 if b.paths_cap else 64
        while cap < b.npaths + paths:
            cap *= 2
        grow = realloc(b.paths, cap * sizeof(PathRec))
        if grow == NULL:
            return -1
        b.paths, b.paths_cap = <PathRec *>grow, cap
    return 0


cdef void publish(WorkerState *w) noexcept nogil:
    # A snapshot of the open pairs, built aside and swapped in under pub_lock: readers
    # never wait for the walk, the worker never waits for a reader's Python.
    cdef PubBuf *b = &w.pub_back
    cdef PubBuf tmp
    cdef Pair *p = w.pairs
    cdef ConnPub *cp
    cdef int k
    b.nconns = 0
    b.npaths = 0
    while p != NULL:
        if p.is_mptcp and p.ps == NULL and w.path_stats:
            # Not path-sampled yet (younger than the scan's first sample): list its paths.
            # (Before Linux 6.5 no sample makes a PathSet: one more call a second.)
            sample_mptcp(w, p, SAMPLE_PATHS)
        k = 0 if p.ps == NULL else p.ps.n + has_other(p.ps)
        if pub_room(b, k) < 0:
            break  # out of memory: a shorter list this time
        cp = &b.conns[b.nconns]
        b.nconns += 1
        memset(cp, 0, sizeof(ConnPub))
        cp.conn_id = p.conn_id
        cp.tag = p.tag
        cp.start_ns = p.start_ns
        cp.bytes_ab = p.half[0].nbytes
        cp.bytes_ba = p.half[1].nbytes
        cp.is_mptcp = p.is_mptcp
        cp.subflows = p.subflows
        cp.connecting = p.connecting
        if p.client_family:
            cp.client.family = p.client_family
            cp.client.port = p.client_port
            memcpy(cp.client.addr, p.client_addr, 16)
        else:
            cp.client = p.peer_a
        cp.upstream = p.upstream
        cp.first_path = b.npaths
        if p.ps != NULL:
            memcpy(&b.paths[b.npaths], p.ps.rec, p.ps.n * sizeof(PathRec))
            b.npaths += p.ps.n
            if has_other(p.ps):
                b.paths[b.npaths] = p.ps.other
                b.npaths += 1
            cp.mptcp_sent = p.ps.mptcp_sent
            cp.mptcp_received = p.ps.mptcp_received
            cp.mptcp_retrans = p.ps.mptcp_retrans
        cp.npaths = b.npaths - cp.first_path
        p = p.next
    c.pthread_mutex_lock(&w.pub_lock)
    tmp = w.pub
    w.pub = w.pub_back
    c.pthread_mutex_unlock(&w.pub_lock)
    # The previous snapshot is freed, not kept for the next one: one snapshot's memory
    # (about 120 bytes per open pair) instead of two; the next publish() grows it again.
    free(tmp.conns)
    free(tmp.paths)
    memset(&w.pub_back, 0, sizeof(PubBuf))
    w.next_pub = w.now + PUBLISH_NS


# -- with the GIL: the engine's structs as the Python objects of _results --------------

# Built for every finished MPTCP pair in collect(): C's inet_ntop and tuple.__new__ (no
# Python-level namedtuple __new__) keep it near a microsecond per path.
_new_tuple = tuple.__new__


cdef object py_addr(Addr *a):
    cdef char buf[c.INET6_ADDRSTRLEN]
    if (a.family != c.AF_INET and a.family != c.AF_INET6) or c.inet_ntop(
            a.family, a.addr, buf, sizeof(buf)) == NULL:
        return None
    return (PyUnicode_DecodeASCII(buf, strlen(buf), NULL), a.port)


cdef object py_paths(PathRec *recs, int n):
    out = []
    cdef int j
    for j in range(n):
        out.append(_new_tuple(PathStat, (
            recs[j].id, py_addr(&recs[j].local) or ("", 0),
            py_addr(&recs[j].remote) or ("", 0), recs[j].sent, recs[j].received,
            recs[j].retrans, recs[j].rtt_us, bool(recs[j].closed) or recs[j].id == 0,
            recs[j].acked,
        )))
    return tuple(out)


cdef object py_pathset(PathSet *ps):
    # The paths of a finished pair, `other` last when it holds bytes.
    if ps == NULL:
        return ()
    out = py_paths(ps.rec, ps.n)
    if has_other(ps):
        out += py_paths(&ps.other, 1)
    return out


def _fold_samples(list samples):
    """Test hook: fold canned MPTCP_FULL_INFO answers, each (struct mptcp_full_info, the
    subflow_info array, the tcp_info array) as bytes in the kernel's layouts, into one
    pair's paths as the engine does. Returns ([established subflows per sample], paths,
    (mptcp bytes sent, received, retrans), path_totals-like dict, reinjected bytes)."""
    cdef WorkerState *w = <WorkerState *>calloc(1, sizeof(WorkerState))
    cdef PathSet *ps = new_pathset(1)  # grown as the engine grows it
    cdef c.mptcp_full_info mfi
    cdef c.tcp_info_paths tcpi[c.MAX_SUBFLOWS]
    cdef c.mptcp_subflow_info sfi[c.MAX_SUBFLOWS]
    cdef uint32_t i, n
    cdef int count
    if w == NULL or ps == NULL:
        free(w)
        free(ps)
        raise MemoryError()
    c.pthread_mutex_init(&w.pub_lock, NULL)
    counts = []
    try:
        for full, sf, tcp in samples:
            memset(&mfi, 0, sizeof(mfi))
            memset(sfi, 0, sizeof(sfi))
            memset(tcpi, 0, sizeof(tcpi))
            memcpy(&mfi, <char *>full, min(<size_t>len(full), sizeof(mfi)))
            memcpy(sfi, <char *>sf, min(<size_t>len(sf), sizeof(sfi)))
            memcpy(tcpi, <char *>tcp, min(<size_t>len(tcp), sizeof(tcpi)))
            n = mfi.num_subflows if mfi.num_subflows < c.MAX_SUBFLOWS else c.MAX_SUBFLOWS
            count = 0
            for i in range(n):
                if sfi[i].id != 0 and subflow_came_up(
                        tcpi[i].tcpi_state, tcpi[i].tcpi_bytes_acked,
                        tcpi[i].tcpi_bytes_received):
                    count += 1
            counts.append(count)
            update_paths(w, &ps, &mfi.info, sfi, tcpi, n)
        totals = {}
        for i in range(<uint32_t>w.naddrs):
            key = py_addr(&w.addrs[i].local)
            totals[key[0]] = [w.addrs[i].sent, w.addrs[i].received, w.addrs[i].retrans,
                              *[w.addrs[i].rtt_count[k] for k in range(RTT_BOUNDS + 1)],
                              w.addrs[i].rtt_sum_us / 1e6]
        mptcp = (ps.mptcp_sent, ps.mptcp_received, ps.mptcp_retrans)
        return (counts, paths_of(ps), mptcp, totals, w.reinjected)  # as take() gives them
    finally:
        c.pthread_mutex_destroy(&w.pub_lock)
        free(ps)
        free(w)
