"""A minimal ctnetlink client: find a connection's original destination in conntrack.

`getsockopt(SO_ORIGINAL_DST)` fails with EOPNOTSUPP on an accepted MPTCP socket, but
the REDIRECT/DNAT entry of its first subflow is still in conntrack. After the NAT, the
accepted socket's own tuple (local -> peer) is that entry's *reply* tuple, so one
IPCTNL_MSG_CT_GET keyed by CTA_TUPLE_REPLY returns the entry, whose CTA_TUPLE_ORIG
destination is where the client meant to go. Needs CAP_NET_ADMIN (ctnetlink checks it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# enum ctattr_type / ctattr_tuple / ctattr_ip / ctattr_l4 (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY = 1, 2
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version (NFNETLINK_V0), res_id (big endian)
_NLATTR = struct.Struct("=HH")  # len, type
_TIMEOUT = 1.0  # the kernel answers synchronously; this only bounds a broken socket

Address = tuple[str, int]


class ConntrackError(OSError):
    """The conntrack query itself failed (no permission, no ctnetlink, bad reply)."""


def _attr(kind: int, payload: bytes) -> bytes:
    data = _NLATTR.pack(_NLATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket's IPv4 peer: conntrack holds it as IPv4
    return addr


def _tuple(kind: int, src: Address, dst: Address, proto: int) -> tuple[int, bytes]:
    s, d = _ip(src[0]), _ip(dst[0])
    if s.version != d.version:
        raise ValueError(f"mixed address families in {src} -> {dst}")
    if s.version == 4:
        family, ip_src, ip_dst = socket.AF_INET, CTA_IP_V4_SRC, CTA_IP_V4_DST
    else:
        family, ip_src, ip_dst = socket.AF_INET6, CTA_IP_V6_SRC, CTA_IP_V6_DST
    return family, _nested(
        kind,
        _nested(CTA_TUPLE_IP, _attr(ip_src, s.packed), _attr(ip_dst, d.packed)),
        _nested(
            CTA_TUPLE_PROTO,
            _attr(CTA_PROTO_NUM, bytes([proto])),
            _attr(CTA_PROTO_SRC_PORT, struct.pack(">H", src[1])),
            _attr(CTA_PROTO_DST_PORT, struct.pack(">H", dst[1])),
        ),
    )


def build_get_by_reply(src: Address, dst: Address, seq: int = 1,
                       proto: int = socket.IPPROTO_TCP) -> bytes:
    """An IPCTNL_MSG_CT_GET request for the entry whose reply tuple is src -> dst."""
    family, attrs = _tuple(CTA_TUPLE_REPLY, src, dst, proto)
    body = _NFGENMSG.pack(family, 0, 0) + attrs
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, pos)
        if length < _NLATTR.size or pos + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[pos + _NLATTR.size:pos + length]
        pos += (length + 3) & ~3


def parse_tuple_dst(payload: bytes, which: int = CTA_TUPLE_ORIG) -> Address | None:
    """The destination (address, port) of tuple `which` in a ctnetlink message body
    (the attributes after the nfgenmsg header); None when it is not there."""
    for kind, value in _attrs(payload):
        if kind != which:
            continue
        host = port = None
        for sub, sval in _attrs(value):
            if sub == CTA_TUPLE_IP:
                for ip_kind, ip_val in _attrs(sval):
                    if ip_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                        host = str(ipaddress.ip_address(ip_val))
            elif sub == CTA_TUPLE_PROTO:
                for p_kind, p_val in _attrs(sval):
                    if p_kind == CTA_PROTO_DST_PORT and len(p_val) == 2:
                        port = struct.unpack(">H", p_val)[0]
        if host is not None and port is not None:
            return host, port
    return None


def parse_reply(data: bytes, seq: int) -> Address | None:
    """The original destination from the kernel's answer; None when there is no entry.

    Raises ConntrackError for any other error the kernel reports.
    """
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        body = data[pos + _NLMSGHDR.size:pos + length]
        pos += (length + 3) & ~3
        if mseq != seq:
            continue
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EPROTO
            if err == errno.ENOENT:
                return None
            raise ConntrackError(err, f"conntrack lookup failed: {os.strerror(err)}")
        if kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            return parse_tuple_dst(body[_NFGENMSG.size:])
    raise ConntrackError(errno.EPROTO, "conntrack lookup failed: no usable answer")


def original_dst_by_reply(local: Address, peer: Address,
                          proto: int = socket.IPPROTO_TCP) -> Address | None:
    """Original destination of the connection whose reply tuple is local -> peer.

    `local`/`peer` are an accepted socket's getsockname()/getpeername() (IPv4-mapped
    IPv6 addresses are looked up as IPv4). None when conntrack has no such entry.
    """
    seq = int.from_bytes(os.urandom(4), "little") or 1
    request = build_get_by_reply(local, peer, seq, proto)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as nl:
            nl.settimeout(_TIMEOUT)
            nl.bind((0, 0))
            nl.send(request)
            data = nl.recv(65536)
    except OSError as exc:
        raise ConntrackError(exc.errno or errno.EIO,
                             f"conntrack lookup failed: {exc.strerror or exc}") from None
    return parse_reply(data, seq)


def probe() -> str | None:
    """None when this process can query conntrack, else a sentence saying why not."""
    try:
        original_dst_by_reply(("127.0.0.1", 9), ("127.0.0.1", 9))
    except ConntrackError as exc:
        if exc.errno == errno.EPERM:
            return ("looking up the original destination in conntrack needs CAP_NET_ADMIN: "
                    "run as root, or use -t tproxy")
        return (f"cannot query conntrack over netlink ({os.strerror(exc.errno or 0)}): "
                "load nf_conntrack_netlink, or use -t tproxy")
    return None
