# The io_uring ABI the experimental engine (mptcpproxy/_uring.pyx) uses, and only that:
# defined here from the kernel's include/uapi/linux/io_uring.h, not included from it, so the
# module builds against manylinux2014's old headers and calls the kernel with syscall(2)
# (no liburing). Layouts are checked at compile time (the _Static_asserts below).

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from *:
    """
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    #ifndef __NR_io_uring_setup
    #define __NR_io_uring_setup 425   /* the same number on every architecture but alpha */
    #define __NR_io_uring_enter 426
    #define __NR_io_uring_register 427
    #endif

    struct ur_sqe {                   /* struct io_uring_sqe, 64 bytes */
        uint8_t opcode;
        uint8_t flags;                /* IOSQE_* */
        uint16_t ioprio;              /* accept/recv: their MULTISHOT flags */
        int32_t fd;
        uint64_t off;                 /* connect: the address length */
        uint64_t addr;
        uint32_t len;
        uint32_t op_flags;            /* msg_flags, accept_flags, cancel_flags... */
        uint64_t user_data;
        uint16_t buf_group;           /* with IOSQE_BUFFER_SELECT */
        uint16_t personality;
        uint32_t file_index;
        uint64_t addr3;
        uint64_t pad2;
    };
    struct ur_cqe { uint64_t user_data; int32_t res; uint32_t flags; };
    struct ur_sq_offsets {
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
        uint64_t user_addr;
    };
    struct ur_cq_offsets {
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
        uint64_t user_addr;
    };
    struct ur_params {
        uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features;
        uint32_t wq_fd, resv[3];
        struct ur_sq_offsets sq_off;
        struct ur_cq_offsets cq_off;
    };
    struct ur_buf { uint64_t addr; uint32_t len; uint16_t bid; uint16_t resv; };
    struct ur_buf_reg {
        uint64_t ring_addr; uint32_t ring_entries; uint16_t bgid; uint16_t flags;
        uint64_t resv[3];
    };
    _Static_assert(sizeof(struct ur_sqe) == 64, "io_uring_sqe is 64 bytes");
    _Static_assert(sizeof(struct ur_cqe) == 16, "io_uring_cqe is 16 bytes");
    _Static_assert(sizeof(struct ur_params) == 120, "io_uring_params is 120 bytes");
    _Static_assert(sizeof(struct ur_buf) == 16, "io_uring_buf is 16 bytes");
    _Static_assert(sizeof(struct ur_buf_reg) == 40, "io_uring_buf_reg is 40 bytes");

    enum {
        UR_OP_NOP = 0, UR_OP_ACCEPT = 13, UR_OP_CLOSE = 19, UR_OP_ASYNC_CANCEL = 14, UR_OP_CONNECT = 16,
        UR_OP_READ = 22, UR_OP_SEND = 26, UR_OP_RECV = 27, UR_OP_SHUTDOWN = 34,
        UR_OP_SOCKET = 45,
        UR_SQE_IO_LINK = 1 << 2, UR_SQE_BUFFER_SELECT = 1 << 5,
        UR_SQE_CQE_SKIP_SUCCESS = 1 << 6,
        UR_ACCEPT_MULTISHOT = 1 << 0, UR_RECV_MULTISHOT = 1 << 1,
        UR_CANCEL_ALL = 1 << 0, UR_CANCEL_FD = 1 << 1,
        UR_CQE_F_BUFFER = 1 << 0, UR_CQE_F_MORE = 1 << 1, UR_CQE_BUFFER_SHIFT = 16,
        UR_SETUP_CQSIZE = 1 << 3, UR_SETUP_SUBMIT_ALL = 1 << 7,
        UR_SETUP_COOP_TASKRUN = 1 << 8, UR_SETUP_SINGLE_ISSUER = 1 << 12,
        UR_SETUP_DEFER_TASKRUN = 1 << 13,
        UR_FEAT_SINGLE_MMAP = 1 << 0, UR_FEAT_NODROP = 1 << 1,
        UR_ENTER_GETEVENTS = 1 << 0,
        UR_REGISTER_PBUF_RING = 22, UR_UNREGISTER_PBUF_RING = 23,
    };
    #define UR_OFF_SQ_RING 0ULL
    #define UR_OFF_CQ_RING 0x8000000ULL
    #define UR_OFF_SQES 0x10000000ULL

    static inline int ur_setup(unsigned entries, struct ur_params *p) {
        return (int)syscall(__NR_io_uring_setup, entries, p);
    }
    static inline int ur_enter(int fd, unsigned submit, unsigned wait, unsigned flags) {
        return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, (void *)0, 0);
    }
    static inline int ur_register(int fd, unsigned op, void *arg, unsigned n) {
        return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
    }
    /* the rings are shared with the kernel: its tails are read with acquire order, our
       tails and heads published with release order */
    static inline uint32_t ur_load(const uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void ur_store(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void ur_store16(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    struct ur_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t op_flags
        uint64_t user_data
        uint16_t buf_group
        uint16_t personality
        uint32_t file_index
        uint64_t addr3
        uint64_t pad2

    struct ur_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct ur_sq_offsets:
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array

    struct ur_cq_offsets:
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags

    struct ur_params:
        uint32_t sq_entries, cq_entries, flags, features
        ur_sq_offsets sq_off
        ur_cq_offsets cq_off

    struct ur_buf:
        uint64_t addr
        uint32_t len
        uint16_t bid
        uint16_t resv

    struct ur_buf_reg:
        uint64_t ring_addr
        uint32_t ring_entries
        uint16_t bgid
        uint16_t flags

    enum:
        UR_OP_NOP, UR_OP_ACCEPT, UR_OP_CLOSE, UR_OP_ASYNC_CANCEL, UR_OP_CONNECT, UR_OP_READ, UR_OP_SEND
        UR_OP_RECV, UR_OP_SHUTDOWN, UR_OP_SOCKET
        UR_SQE_IO_LINK, UR_SQE_BUFFER_SELECT, UR_SQE_CQE_SKIP_SUCCESS
        UR_ACCEPT_MULTISHOT, UR_RECV_MULTISHOT, UR_CANCEL_ALL, UR_CANCEL_FD
        UR_CQE_F_BUFFER, UR_CQE_F_MORE, UR_CQE_BUFFER_SHIFT
        UR_SETUP_CQSIZE, UR_SETUP_SUBMIT_ALL, UR_SETUP_COOP_TASKRUN, UR_SETUP_SINGLE_ISSUER
        UR_SETUP_DEFER_TASKRUN, UR_FEAT_SINGLE_MMAP, UR_FEAT_NODROP, UR_ENTER_GETEVENTS
        UR_REGISTER_PBUF_RING, UR_UNREGISTER_PBUF_RING

    unsigned long long UR_OFF_SQ_RING, UR_OFF_CQ_RING, UR_OFF_SQES

    int ur_setup(unsigned entries, ur_params *p) nogil
    int ur_enter(int fd, unsigned submit, unsigned wait, unsigned flags) nogil
    int ur_register(int fd, unsigned op, void *arg, unsigned n) nogil
    uint32_t ur_load(const uint32_t *p) nogil
    void ur_store(uint32_t *p, uint32_t v) nogil
    void ur_store16(uint16_t *p, uint16_t v) nogil


cdef extern from "<errno.h>" nogil:
    enum:
        EBUSY
