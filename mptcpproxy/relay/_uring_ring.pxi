# The ring of a worker: set up (its mappings and the provided buffers) and taken down.
# Included by mptcpproxy/_uring.pyx.

cdef int ring_open(Worker *w) noexcept nogil:
    # The ring, its three mappings and the provided buffers; -errno on failure (the caller
    # then runs ring_close, which undoes what was done).
    cdef ur_params p
    cdef char *sq
    cdef uint32_t i
    cdef int ret
    memset(&p, 0, sizeof(p))
    p.flags = (UR_SETUP_CQSIZE | UR_SETUP_SUBMIT_ALL | UR_SETUP_SINGLE_ISSUER
               | UR_SETUP_DEFER_TASKRUN)
    p.cq_entries = CQ_ENTRIES
    w.ring = ur_setup(SQ_ENTRIES, &p)
    if w.ring < 0:
        w.ring = -1
        return -c.errno
    if not (p.features & UR_FEAT_SINGLE_MMAP) or not (p.features & UR_FEAT_NODROP):
        return -c.ENOSYS
    w.sq_map_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t)
    w.cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(ur_cqe)
    if w.cq_map_len > w.sq_map_len:
        w.sq_map_len = w.cq_map_len
    w.sq_map = mmap(NULL, w.sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                    w.ring, UR_OFF_SQ_RING)
    if w.sq_map == MAP_FAILED:
        w.sq_map = NULL
        return -c.errno
    w.sqes_len = p.sq_entries * sizeof(ur_sqe)
    w.sqes = <ur_sqe *>mmap(NULL, w.sqes_len, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_POPULATE, w.ring, UR_OFF_SQES)
    if <void *>w.sqes == MAP_FAILED:
        w.sqes = NULL
        return -c.errno
    sq = <char *>w.sq_map  # one mapping holds both rings (FEAT_SINGLE_MMAP)
    w.sq_head = <uint32_t *>(sq + p.sq_off.head)
    w.sq_tail = <uint32_t *>(sq + p.sq_off.tail)
    w.sq_array = <uint32_t *>(sq + p.sq_off.array)
    w.sq_mask = (<uint32_t *>(sq + p.sq_off.ring_mask))[0]
    w.sq_entries = p.sq_entries
    for i in range(p.sq_entries):
        w.sq_array[i] = i  # entries are always used in order
    w.cq_head = <uint32_t *>(sq + p.cq_off.head)
    w.cq_tail = <uint32_t *>(sq + p.cq_off.tail)
    w.cq_mask = (<uint32_t *>(sq + p.cq_off.ring_mask))[0]
    w.cqes = <ur_cqe *>(sq + p.cq_off.cqes)
    for i in range(2):
        if w.pool[i].count:
            ret = pool_open(w, i)
            if ret < 0:
                return ret
    return 0


cdef int pool_open(Worker *w, int g) noexcept nogil:
    # Buffer group g: its ring and buffers mapped, registered, every buffer in the ring.
    cdef Pool *pool = &w.pool[g]
    cdef ur_buf_reg reg
    cdef uint32_t i
    pool.ring = <ur_buf *>mmap(NULL, pool.count * sizeof(ur_buf), PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if <void *>pool.ring == MAP_FAILED:
        pool.ring = NULL
        return -c.errno
    pool.mem = <char *>mmap(NULL, <size_t>pool.count * pool.size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if <void *>pool.mem == MAP_FAILED:
        pool.mem = NULL
        return -c.errno
    memset(&reg, 0, sizeof(reg))
    reg.ring_addr = <uint64_t>pool.ring
    reg.ring_entries = pool.count
    reg.bgid = <uint16_t>g
    if ur_register(w.ring, UR_REGISTER_PBUF_RING, &reg, 1) < 0:
        return -c.errno
    for i in range(pool.count):
        recycle(w, g, i)
    return 0


cdef void ring_close(Worker *w) noexcept nogil:
    # After the loop: nothing is pending any more, so closing the ring frees its buffers.
    if w.ring >= 0:
        c.close(w.ring)
        w.ring = -1
    if w.sqes != NULL:
        munmap(w.sqes, w.sqes_len)
        w.sqes = NULL
    if w.sq_map != NULL:
        munmap(w.sq_map, w.sq_map_len)
        w.sq_map = NULL
    for i in range(2):
        if w.pool[i].mem != NULL:
            munmap(w.pool[i].mem, <size_t>w.pool[i].count * w.pool[i].size)
            w.pool[i].mem = NULL
        if w.pool[i].ring != NULL:
            munmap(w.pool[i].ring, w.pool[i].count * sizeof(ur_buf))
            w.pool[i].ring = NULL
