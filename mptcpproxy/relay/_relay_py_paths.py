"""The pure-Python twin's per-path accounting (Relay(path_stats=True)); keep it in step with
`_relay_paths.pxi`. One MPTCP_FULL_INFO call per sample, read through libc (the request
header must be filled in, which socket.getsockopt() cannot do), parsed with struct."""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
from bisect import bisect_left

from mptcpproxy.relay._results import MAX_PATHS, PathStat

SOL_MPTCP, MPTCP_FULL_INFO = 284, 4
MAX_SUBFLOWS = 16  # entries read per call
MAX_ADDRS = 64  # local addresses a worker counts path bytes for; past that: None ("other")
TCPI_SIZE = 216  # bytes of tcp_info read per subflow: up to tcpi_bytes_retrans (@208)
SFI_SIZE = 264  # struct mptcp_subflow_info
MFI_SIZE = 136  # struct mptcp_full_info, struct mptcp_info (96 B) at 40
# Upper bounds of the RTT histogram, microseconds (rtt_bounds_us in _relay_paths.pxi).
RTT_BOUNDS_US = (500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                 1000000, 2500000)
_NO_ADDR = ("", 0)
_libc = ctypes.CDLL(None, use_errno=True)


def full_info(fd: int) -> tuple[bytes, bytes, bytes] | None:
    """MPTCP_FULL_INFO of fd: (struct mptcp_full_info, the subflow_info array, the tcp_info
    array), None before Linux 6.5 (or not an MPTCP socket)."""
    sfi = ctypes.create_string_buffer(SFI_SIZE * MAX_SUBFLOWS)
    tcpi = ctypes.create_string_buffer(TCPI_SIZE * MAX_SUBFLOWS)
    head = struct.pack("=6I2Q", 0, TCPI_SIZE, 0, SFI_SIZE, 0, MAX_SUBFLOWS,
                       ctypes.addressof(sfi), ctypes.addressof(tcpi))
    buf = ctypes.create_string_buffer(head + bytes(MFI_SIZE - len(head)), MFI_SIZE)
    size = ctypes.c_uint32(MFI_SIZE)
    if _libc.getsockopt(fd, SOL_MPTCP, MPTCP_FULL_INFO, buf, ctypes.byref(size)) != 0:
        return None
    return buf.raw, sfi.raw, tcpi.raw


def sockaddr(raw: bytes, off: int) -> tuple[str, int] | None:
    """The (host, port) of a struct sockaddr_storage at `off`; IPv4-mapped as IPv4."""
    family, = struct.unpack_from("=H", raw, off)
    port, = struct.unpack_from("!H", raw, off + 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[off + 4:off + 8]), port
    if family == socket.AF_INET6:
        addr = raw[off + 8:off + 24]
        if addr[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, addr[12:]), port
        return socket.inet_ntop(socket.AF_INET6, addr), port
    return None


def subflows_of(mfi: bytes, sfi: bytes, tcpi: bytes) -> list[tuple]:
    """The listed subflows: (id, local, remote, state, acked, received, sent, retrans, rtt)."""
    n = min(struct.unpack_from("=I", mfi, 16)[0], MAX_SUBFLOWS)
    out = []
    for i in range(n):
        s, t = i * SFI_SIZE, i * TCPI_SIZE
        rtt, = struct.unpack_from("=I", tcpi, t + 68)
        acked, received = struct.unpack_from("=QQ", tcpi, t + 120)
        sent, retrans = struct.unpack_from("=QQ", tcpi, t + 200)
        out.append((struct.unpack_from("=I", sfi, s)[0], sockaddr(sfi, s + 8),
                    sockaddr(sfi, s + 136), tcpi[t], acked, received, sent, retrans, rtt))
    return out


def totals_of(mfi: bytes) -> tuple[int, int, int, int]:
    """The connection's mptcpi_bytes_sent, _received, _retrans, _acked."""
    retrans, sent, received, acked = struct.unpack_from("=4Q", mfi, 40 + 48)
    return sent, received, retrans, acked


class AddrTotals:
    """Path bytes per local address, one worker, since start (read by Relay.path_totals)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: dict[str | None, list] = {}
        self.reinjected = 0

    def row(self, local: tuple | None) -> list:
        key = local[0] if local else None
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_ADDRS + (None in self.rows):
                key = None
            row = self.rows.setdefault(key, [0] * (5 + len(RTT_BOUNDS_US)))
        return row

    def add_to(self, out: dict) -> int:
        with self.lock:
            for key, row in self.rows.items():
                into = out.setdefault(key, [0] * len(row))
                for k, v in enumerate(row):
                    into[k] += v
            return self.reinjected


def _grown(now: int, before: int) -> int:
    return now - before if now > before else 0


class PathSet:
    """The last sample per subflow id of one MPTCP pair (a PathSet in _relay_paths.pxi)."""

    __slots__ = ("recs", "other", "totals")

    def __init__(self) -> None:
        # [id, local, remote, sent, received, retrans, rtt, closed, acked]: PathStat's order
        self.recs: list[list] = []
        self.other = [0, _NO_ADDR, _NO_ADDR, 0, 0, 0, 0, True, 0]
        self.totals = [0, 0, 0, 0]  # mptcpi_bytes_sent, _received, _retrans, _acked

    def _slot(self, sf: tuple) -> list | None:
        for rec in self.recs:
            if rec[0] == sf[0]:
                return rec
        new = [sf[0], sf[1] or _NO_ADDR, sf[2] or _NO_ADDR, 0, 0, 0, 0, False, 0]
        if len(self.recs) < MAX_PATHS:
            self.recs.append(new)
            return new
        for j, rec in enumerate(self.recs):
            if rec[7]:  # a closed one makes room; its counts go to `other`
                for k in (3, 4, 5, 8):
                    self.other[k] += rec[k]
                self.recs[j] = new
                return new
        return None

    def fold(self, mfi: bytes, sfi: bytes, tcpi: bytes, acc: AddrTotals) -> int:
        """Fold one sample in; returns the established subflows."""
        from mptcpproxy.relay._relay_py_pump import subflow_came_up

        listed = subflows_of(mfi, sfi, tcpi)
        now = totals_of(mfi)
        seen, untracked = set(), False
        listed_acked = listed_received = 0
        count = 0
        with acc.lock:
            for sf in listed:
                sid, _, _, state, acked, received, sent, retrans, rtt = sf
                if sid == 0:
                    continue  # after a reset: one empty entry, the subflows are gone
                count += subflow_came_up(state, acked, received)
                rec = self._slot(sf)
                if rec is None:
                    untracked = True
                    continue
                seen.add(id(rec))
                ds, dr, dx = _grown(sent, rec[3]), _grown(received, rec[4]), _grown(retrans, rec[5])
                da = _grown(acked, rec[8])
                rec[3] += ds
                rec[4] += dr
                rec[5] += dx
                rec[8] += da
                rec[6], rec[7] = rtt, False
                listed_acked += da
                listed_received += dr
                row = acc.row(rec[1])
                row[0] += da
                row[1] += dr
                row[2] += dx
                if state == 1 and rtt > 0:
                    row[3 + bisect_left(RTT_BOUNDS_US, rtt)] += 1
                    row[-1] += rtt / 1e6
            gone = [rec for rec in self.recs if id(rec) not in seen and not rec[7]]
            for rec in gone:
                rec[7] = True
            if gone or untracked:
                # acknowledged bytes on both levels: a sent count includes local drops
                missed_a = _grown(_grown(now[3], self.totals[3]), listed_acked)
                missed_r = _grown(_grown(now[1], self.totals[1]), listed_received)
                rec = gone[0] if len(gone) == 1 and not untracked else self.other
                rec[3] += missed_a
                rec[8] += missed_a
                rec[4] += missed_r
                if rec is not self.other:
                    row = acc.row(rec[1])
                    row[0] += missed_a
                    row[1] += missed_r
            acc.reinjected += _grown(now[2], self.totals[2])
        self.totals = [max(a, b) for a, b in zip(self.totals, now, strict=True)]
        return count

    def closed(self) -> None:
        for rec in self.recs:
            rec[7] = True

    def stats(self) -> tuple:
        out = tuple(PathStat(*rec) for rec in self.recs)
        if any(self.other[3:6]) or self.other[8]:
            out += (PathStat(*self.other),)
        return out


def peer(sock: socket.socket | None) -> tuple | None:
    """(host, port) sock is connected to; None for other families or when unknown."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        addr = sock.getpeername()
    except OSError:
        return None
    host = addr[0][7:] if addr[0].startswith("::ffff:") and "." in addr[0] else addr[0]
    return host, addr[1]


def fold_samples(samples: list) -> tuple:
    """Test hook, as _relay._fold_samples: canned MPTCP_FULL_INFO answers folded into one
    pair's paths."""
    acc, paths = AddrTotals(), PathSet()
    counts = [paths.fold(*sample, acc) for sample in samples]
    totals: dict = {}
    reinjected = acc.add_to(totals)
    return counts, paths.stats(), tuple(paths.totals[:3]), totals, reinjected
