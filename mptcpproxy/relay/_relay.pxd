# The relay's C state: enums and structs, shared by _relay.pyx and its includes.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mptcpproxy.relay cimport _sys as c


cdef enum:
    R_CLOSED = 0
    R_RESET = 1
    R_TIMEOUT = 2
    R_ERROR = 3
    R_ABORTED = 4
    R_FAILED = 5  # the upstream could not be reached (accepted by the worker itself)
    R_ACCEPT_ERROR = 6  # not a pair: accept() failed for want of fds or memory

cdef enum:
    # What sample_mptcp() asks the kernel (see docs/design.md, "MPTCP sampling").
    SAMPLE_STATUS = 0  # at connect: TCP_IS_MPTCP only (an established one has a subflow)
    SAMPLE_PATHS = 1  # the subflows, and with path_stats each one's counters (a path sample)

cdef enum:
    NOTIFY_MS = 20  # the longest a finished pair waits to be reported: fewer wake-ups
    MAX_EVENTS = 256
    READ_BUDGET = 16  # reads per half and turn: a fast sender cannot starve the others
    POOL_KEEP = 8  # spare pending buffers a worker keeps (each one --buffer-size)
    NS = 1000000000
    ACCEPT_BATCH = 64  # accepts per wake-up, so open pairs get their turn in between
    SPLICE_MIN = 65536  # a read this large makes a half splice; a turn moving less, copy
    MAX_LISTENERS = 128  # listening sockets a relay serves at once (Relay.listen)
    MAX_TAGS = 1024  # listener tags (the control plane's listener index): 0 .. MAX_TAGS-1
    MAX_PATHS = 9  # subflows kept per connection (_results.MAX_PATHS): the kernel allows 8 + 1
    SMALL_PATHS = 2  # records of a new PathSet; spare ones of this size are reused
    MAX_ADDRS = 64  # local addresses a worker counts path bytes for; past that: "other"
    RTT_BOUNDS = 12  # buckets of the path RTT histogram (rtt_bounds_us in _relay_paths.pxi)
    PUBLISH_NS = 1000000000  # a worker publishes its open pairs (connections()) this often


cdef struct Addr:
    # An IP address with a port, as the engine keeps them (family 0: none).
    uint8_t family  # AF_INET or AF_INET6
    uint16_t port
    uint8_t addr[16]


cdef struct PathRec:
    # One subflow as last sampled (id 0: the "closed subflows" entry, no addresses).
    uint32_t id
    int closed
    Addr local
    Addr remote
    uint64_t sent
    uint64_t received
    uint64_t retrans
    uint64_t acked
    uint32_t rtt_us


cdef struct PathSet:
    # The per-path state of one MPTCP pair (Relay(path_stats=True)), taken at its first
    # sample from the worker's spare ones or allocated; it moves to the pair's report
    # (Done) at the end, take() copies it into the Result's PathList and gives it back to
    # the worker (ps_returned). Only `cap` records are allocated (pathset_size), grown up
    # to MAX_PATHS as subflows come: most connections never have more than two.
    int n  # records in use
    int cap  # records allocated
    PathSet *next_free  # in a worker's chain of spare sets (ps_pool, ps_returned)
    PathRec other  # id 0: bytes the samples could not give to one subflow
    uint64_t mptcp_sent  # the connection's mptcpi_bytes_* at the last sample
    uint64_t mptcp_received
    uint64_t mptcp_retrans
    uint64_t mptcp_acked
    PathRec rec[MAX_PATHS]  # last: only rec[0:cap] is allocated


cdef struct AddrStat:
    # Path bytes counted per local address by one worker, since start (for the metrics).
    Addr local  # port 0; family 0: "other" (past MAX_ADDRS)
    uint64_t sent  # acknowledged by the peer (tcpi_bytes_acked), see PathStat.bytes_acked
    uint64_t received
    uint64_t retrans
    uint64_t rtt_count[RTT_BOUNDS + 1]
    uint64_t rtt_sum_us


cdef struct ConnPub:
    # One open pair as its worker last published it (Relay.connections()).
    uint64_t conn_id
    uint32_t tag
    int64_t start_ns
    uint64_t bytes_ab
    uint64_t bytes_ba
    int is_mptcp
    int subflows
    Addr client
    Addr upstream
    int npaths  # its paths: pub_paths[first_path : first_path + npaths]
    int first_path
    uint64_t mptcp_sent
    uint64_t mptcp_received
    uint64_t mptcp_retrans
    int connecting  # Pair.connecting


cdef struct ListenCfg:
    # What a worker does with the clients of one listener: connect each to this upstream.
    c.sockaddr_storage up_addr
    c.socklen_t up_len
    int up_family
    int up_proto
    int up_mptcp_side
    unsigned int mark
    uint32_t tag
    int64_t connect_ns
    int64_t idle_ns
    int splice


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
    # Splicing (Relay(splice=True)): a half that moves bulk sends its bytes src -> pipe ->
    # dst, never through user space. The pipe is held only while the half splices.
    int splicing  # 1 while splicing (it holds `pipe`), -1 when splice() is not supported here
    int pipe[2]
    size_t inpipe  # bytes in the pipe, not yet sent on


cdef struct PubBuf:
    ConnPub *conns
    int nconns
    int conns_cap
    PathRec *paths
    int npaths
    int paths_cap


cdef struct Pair:
    Side side[2]
    Half half[2]
    uint64_t conn_id
    uint32_t tag  # the listener it came from (Result.tag; open pairs counted per tag)
    int64_t idle_ns  # close after this long without a byte moving (0: never)
    int64_t connect_ns  # give up connecting upstream after this long (accepted pairs)
    int splice  # halves that move bulk splice through a pipe
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
    ListenCfg *held  # no fd for the upstream yet: the upstream to open (scan retries)
    int client_family  # set for pairs the worker accepted itself
    uint16_t client_port
    uint8_t client_addr[16]
    Addr peer_a  # where side 0 is connected, for a pair given to Relay.add (connections())
    Addr upstream  # where side 1 is connected (connections())
    PathSet *ps  # path_stats, MPTCP: the last sample per subflow (NULL until one)
    Pair *prev
    Pair *next  # the worker's list of open pairs, or the incoming / graveyard chain
    Pair *ready_next


cdef struct Done:
    uint64_t conn_id
    uint32_t tag
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
    PathSet *ps  # the pair's paths, freed by whoever takes the report (NULL: none)


cdef struct Listener:
    # One listening socket in one worker. The control thread writes fd/want/next under the
    # worker's lock; the worker alone touches `cfg`, `listening` and `resume_ns`, copies
    # `next` to `cfg` when `dirty`, and frees the slot (fd = -1, under the lock) once it has
    # taken the socket out of its epoll set after `want` went to 0.
    int fd  # -1: a free slot
    int want
    int dirty
    int listening  # in this worker's epoll set
    int64_t resume_ns  # accepting paused (out of fds) until then
    ListenCfg cfg
    ListenCfg next


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
    int64_t busy_ns  # poll without sleeping for this long after the last event (0: never)
    int64_t last_event
    int pipes[2 * POOL_KEEP]  # spare empty pipes, read and write end
    int npipes
    # Finished pairs wait here for collect(), which swaps `done` with `spare` under
    # out_lock: the worker never needs the GIL to report.
    c.pthread_mutex_t out_lock
    Done *done
    int ndone
    int done_cap
    Done *spare
    int spare_cap
    # Spare PathSets of SMALL_PATHS records: no malloc() in the worker nor free() in the
    # control thread per MPTCP pair. take() chains the ones it copied onto ps_returned
    # (under out_lock); put_done() moves them to ps_pool (the worker's own) when it is empty.
    PathSet *ps_pool
    PathSet *ps_returned
    int notify_pending
    int64_t last_notify
    int64_t now
    int64_t next_scan
    uint64_t total  # pairs handed over or accepted: written under lock, read atomically
    uint64_t finished  # written by the worker only, read atomically (active_pairs)
    uint64_t nbytes
    int fatal_errno
    # accept + connect in the worker (Relay.listen): the fast path for a fixed upstream
    Listener listeners[MAX_LISTENERS]
    int nlisteners  # slots in use at most (the highest used index + 1)
    int nheld  # accepted clients waiting for an fd for their upstream (no accepting then)
    int paused  # a wanted listener is out of the epoll set for now (out of fds)
    uint64_t accepted
    uint64_t accept_errors
    int64_t *open_by_tag  # pairs open per listener tag (MAX_TAGS entries), atomic
    int64_t *accepted_by_tag  # clients this worker accepted per listener tag, atomic
    # Per-path accounting (Relay(path_stats=True)). The worker builds a snapshot of its
    # open pairs in `pub_back` every PUBLISH_NS (and once when its last pair ended), then
    # swaps it with `pub` under pub_lock; connections() copies `pub` under pub_lock. The
    # per-address counters are updated and read under pub_lock too.
    int path_stats
    c.pthread_mutex_t pub_lock
    PubBuf pub
    PubBuf pub_back
    int64_t next_pub
    AddrStat addrs[MAX_ADDRS + 1]  # the last one: "other"
    int naddrs
    uint64_t reinjected  # mptcpi_bytes_retrans increments, all pairs
