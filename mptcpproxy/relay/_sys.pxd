# C declarations the relay uses, and only those.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        ECONNRESET
        EPIPE
        EINPROGRESS
        ETIMEDOUT
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        EINVAL
        ENOSYS
        ECANCELED
        EOPNOTSUPP
    # EWOULDBLOCK == EAGAIN on Linux: declared as int so Cython emits no duplicate case.
    int EWOULDBLOCK


cdef extern from "<signal.h>" nogil:
    # sigprocmask() sets the calling thread's mask on Linux, as pthread_sigmask() does,
    # and binds to an old glibc symbol (pthread_sigmask is GLIBC_2.32 in libc).
    ctypedef struct sigset_t:
        pass
    enum:
        SIGPIPE
        SIG_BLOCK
    int sigemptyset(sigset_t *set)
    int sigaddset(sigset_t *set, int signum)
    int sigprocmask(int how, const sigset_t *set, sigset_t *oldset)


cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_fcntl


cdef extern from "<unistd.h>" nogil:
    # fcntl() goes through syscall(): glibc >= 2.28 headers bind fcntl to fcntl64, a symbol
    # that would lift the wheel from manylinux2014 to manylinux_2_28.
    long syscall(long number, ...)
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<fcntl.h>" nogil:
    # splice(), pipe2() and F_SETPIPE_SZ need _GNU_SOURCE, which Python.h defines.
    enum:
        O_NONBLOCK
        O_CLOEXEC
        F_SETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t len, unsigned int flags)
    int pipe2(int fds[2], int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SHUT_WR
        SHUT_RDWR
        SOL_SOCKET
        SO_ERROR
        SO_LINGER
        SO_MARK
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        AF_INET
        AF_INET6
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct linger:
        int l_onoff
        int l_linger
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int getpeername(int fd, sockaddr *addr, socklen_t *len)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        uint16_t sin6_port
        in6_addr sin6_addr
    uint16_t ntohs(uint16_t n)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLLEXCLUSIVE
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    union epoll_data:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from * nogil:
    # GCC/Clang builtins: the connection-id counter shared by all threads, and the pair
    # counters one thread writes while another reads them.
    uint64_t __atomic_fetch_add(uint64_t *ptr, uint64_t val, int memorder)
    uint64_t __atomic_load_n(uint64_t *ptr, int memorder)
    int64_t __atomic_load_i64 "__atomic_load_n"(int64_t *ptr, int memorder)
    int64_t __atomic_fetch_add_i64 "__atomic_fetch_add"(int64_t *ptr, int64_t val,
                                                         int memorder)
    void __atomic_store_n(uint64_t *ptr, uint64_t val, int memorder)
    enum:
        __ATOMIC_RELAXED
        __ATOMIC_ACQUIRE
        __ATOMIC_RELEASE


cdef extern from "<time.h>" nogil:
    enum:
        CLOCK_MONOTONIC
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


# MPTCP (include/uapi/linux/mptcp.h, tcp.h): not in glibc's headers on every system.
cdef enum:
    SOL_MPTCP = 284
    MPTCP_INFO = 1
    MPTCP_FULL_INFO = 4  # Linux 6.5+
    TCP_IS_MPTCP = 43
    MAX_SUBFLOWS = 16  # entries read per MPTCP_FULL_INFO call (the kernel allows 8 + 1)


cdef struct mptcp_info:
    # struct mptcp_info of Linux 6.18 (96 bytes); the kernel copies min(optlen, its size).
    uint8_t mptcpi_subflows  # additional subflows, the first not counted, pending joins too
    uint8_t mptcpi_add_addr_signal
    uint8_t mptcpi_add_addr_accepted
    uint8_t mptcpi_subflows_max
    uint8_t skip[44]
    uint64_t mptcpi_bytes_retrans  # @48: data-level reinjections (6.6+; 0 before)
    uint64_t mptcpi_bytes_sent  # @56
    uint64_t mptcpi_bytes_received  # @64
    uint64_t mptcpi_bytes_acked  # @72
    uint8_t rest[16]


cdef struct mptcp_full_info:
    # MPTCP_FULL_INFO (include/uapi/linux/mptcp.h): a request header the caller fills (the
    # user sizes and array pointers), the kernel's answer in the same buffer.
    uint32_t size_tcpinfo_kernel  # out
    uint32_t size_tcpinfo_user  # in: bytes of tcp_info wanted per subflow
    uint32_t size_sfinfo_kernel  # out
    uint32_t size_sfinfo_user  # in: bytes of mptcp_subflow_info wanted per subflow
    uint32_t num_subflows  # out: all subflows, also those the arrays had no room for
    uint32_t size_arrays_user  # in: entries in each array
    uint64_t subflow_info  # in: user pointer
    uint64_t tcp_info  # in: user pointer
    mptcp_info info  # out


cdef struct tcp_info_head:
    # The leading 136 bytes of struct tcp_info (include/uapi/linux/tcp.h).
    uint8_t tcpi_state
    uint8_t skip1[119]
    uint64_t tcpi_bytes_acked  # @120: +1 for our SYN once the active open completed
    uint64_t tcpi_bytes_received  # @128: +1 for the peer's FIN


cdef struct tcp_info_paths:
    # The leading 216 bytes of struct tcp_info: what a per-path sample needs.
    uint8_t tcpi_state
    uint8_t skip1[67]
    uint32_t tcpi_rtt  # @68, microseconds
    uint8_t skip2[48]
    uint64_t tcpi_bytes_acked  # @120
    uint64_t tcpi_bytes_received  # @128
    uint8_t skip3[64]
    uint64_t tcpi_bytes_sent  # @200: payload sent, retransmissions included
    uint64_t tcpi_bytes_retrans  # @208


cdef struct mptcp_subflow_info:
    # struct mptcp_subflow_info (264 bytes): the subflow id and its two sockaddr_storage.
    uint32_t id  # unique per connection, never reused (6.5+)
    uint32_t pad
    uint8_t local[128]
    uint8_t remote[128]
