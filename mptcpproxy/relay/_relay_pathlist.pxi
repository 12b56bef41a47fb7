# Included by _relay.pyx: a finished pair's paths as Result.paths. The PathList holds a
# copy of the report's PathSet inside itself (no allocation: a free list of PathLists;
# take() gives the PathSet back to the worker): the PathStat tuples are built only when
# someone reads them (a JSON log, a test), and the end line's "paths=" text is formatted
# here in C. In Python the two cost about 2.5 us per MPTCP connection, half of what the proxy
# spends on one in the control thread (bench/README.md, "per-path sampling on and off").
# The rule is connlog.path_shares(): the pure-Python twin's Results go through it, and
# test_paths_unit checks the two give the same text.

import collections.abc

cdef enum:
    PATH_TEXT_MAX = 1536  # (MAX_PATHS + 1) paths of at most 2 * 47 + 7 characters


cdef inline int path_count(PathSet *ps) noexcept nogil:
    # (NULL: a PathList made from Python, PathList(), which holds no paths.)
    return 0 if ps == NULL else ps.n + has_other(ps)


cdef inline PathRec *path_at(PathSet *ps, int k) noexcept nogil:
    # The paths in the order of Result.paths: the records, then `other` when it holds bytes.
    return &ps.rec[k] if k < ps.n else &ps.other


cdef inline uint64_t percent(uint64_t n, uint64_t total) noexcept nogil:
    # round(100 * n / total) with halves to even, as Python's round() (connlog.percent);
    # exact up to 2**57 bytes, beyond which both are halved (a few hundred petabytes).
    cdef uint64_t q, r
    while total >= (<uint64_t>1 << 57):
        n >>= 1
        total >>= 1
    if total == 0:
        return 0
    q = 100 * n // total
    r = 100 * n % total
    if 2 * r > total or (2 * r == total and q & 1):
        q += 1
    return q


cdef size_t put_uint(char *out, size_t at, uint64_t v) noexcept nogil:
    cdef char digits[20]
    cdef int k = 0
    while True:
        digits[k] = <char>(48 + v % 10)  # '0' + digit
        k += 1
        v //= 10
        if v == 0:
            break
    while k > 0:
        k -= 1
        out[at] = digits[k]
        at += 1
    return at


cdef size_t put_host(char *out, size_t at, Addr *a) noexcept nogil:
    # "192.0.2.1" or "[2001:db8::1]" at out[at:] (nothing for an unknown family). IPv4
    # by hand: glibc's inet_ntop() formats it with sprintf(), a third of the text's cost.
    cdef char buf[c.INET6_ADDRSTRLEN]
    cdef size_t n
    cdef int k
    if a.family == c.AF_INET:
        for k in range(4):
            if k:
                out[at] = b'.'
                at += 1
            at = put_uint(out, at, a.addr[k])
        return at
    if a.family != c.AF_INET6 or c.inet_ntop(
            a.family, a.addr, buf, sizeof(buf)) == NULL:
        return at
    n = strlen(buf)
    out[at] = b'['
    memcpy(out + at + 1, buf, n)
    out[at + n + 1] = b']'
    return at + n + 2


cdef size_t format_paths(PathSet *ps, char *out) noexcept nogil:
    # "LOCAL>REMOTE N%" per path, comma-separated ("closed subflows N%" for the id-0
    # entry, left out at 0 %), of the bytes in the direction that carried more
    # (connlog.path_amounts).
    cdef int k, count = path_count(ps)
    cdef int by_sent
    cdef uint64_t sent = 0, received = 0, total, share
    cdef size_t at = 0
    cdef PathRec *r
    for k in range(count):
        r = path_at(ps, k)
        sent += r.acked if r.acked else r.sent
        received += r.received
    by_sent = sent > received
    total = sent if by_sent else received
    if total == 0:
        total = 1
    for k in range(count):
        r = path_at(ps, k)
        share = percent((r.acked if r.acked else r.sent) if by_sent else r.received, total)
        if r.id == 0 and share == 0:
            continue  # the connection's DATA_FIN after its subflows closed, a stray byte
        if at:
            out[at] = b','
            at += 1
        if r.id == 0:
            memcpy(out + at, b"closed subflows", 15)
            at += 15
        else:
            at = put_host(out, at, &r.local)
            out[at] = b'>'
            at += 1
            at = put_host(out, at, &r.remote)
        out[at] = b' '
        at += 1
        at = put_uint(out, at, share)
        out[at] = b'%'
        at += 1
    return at


@cython.final
@cython.no_gc  # holds a tuple of PathStat and a str: never part of a cycle
@cython.freelist(64)
cdef class PathList:
    """Result.paths of the compiled engine: a sequence of PathStat (equal to the tuple of
    them, built on first use) and `text`, the end line's paths= value."""

    cdef PathSet *ps  # &self.held; NULL only in a PathList() made from Python (no paths)
    cdef PathSet held  # a copy of the report's PathSet (its `cap` records)
    cdef tuple items
    cdef str _text

    cdef tuple get(self):
        if self.items is None:
            self.items = py_pathset(self.ps)
        return self.items

    @property
    def text(self):
        cdef char buf[PATH_TEXT_MAX]
        cdef size_t n
        if self._text is None:
            n = format_paths(self.ps, buf)
            self._text = PyUnicode_DecodeASCII(buf, n, NULL)
        return self._text

    def __len__(self):
        return path_count(self.ps)

    def __iter__(self):
        return iter(self.get())

    def __getitem__(self, index):
        return self.get()[index]

    def index(self, value, *args):
        return self.get().index(value, *args)

    def count(self, value):
        return self.get().count(value)

    def __add__(self, other):
        return tuple(self) + other

    def __radd__(self, other):
        return other + tuple(self)

    def __mul__(self, n):
        return tuple(self) * n

    def __rmul__(self, n):
        return tuple(self) * n

    def __lt__(self, other):
        return tuple(self) < other

    def __le__(self, other):
        return tuple(self) <= other

    def __gt__(self, other):
        return tuple(self) > other

    def __ge__(self, other):
        return tuple(self) >= other

    def __eq__(self, other):
        if isinstance(other, PathList):
            other = (<PathList>other).get()
        return self.get() == other

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.get())

    def __repr__(self):
        return repr(self.get())

    def __reduce__(self):
        return (tuple, (self.get(),))


collections.abc.Sequence.register(PathList)


cdef object paths_of(PathSet *ps):
    # Result.paths for a report's PathSet (() when there is none): a copy, the caller
    # keeps ps.
    cdef PathList out
    if path_count(ps) == 0:
        return ()
    out = PathList.__new__(PathList)
    memcpy(&out.held, ps, pathset_size(ps.cap))
    out.ps = &out.held
    return out
