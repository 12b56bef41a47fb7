"""PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): a strict incremental parser and
the reference encoders.

The parser is meant for a non-blocking socket read with MSG_PEEK: call `parse()` on whatever
has arrived; it answers `NeedMore`, a complete `Header` or raises `ProxyHeaderError`. It never
looks past the header's own bytes, so after a `Header` the caller recv()s exactly
`header.length` bytes and leaves the application data (which may have come in the same
segment) in the socket:

    result = parse(sock.recv(DEFAULT_MAX_V2, socket.MSG_PEEK))   # on each readable event
    if isinstance(result, Header):
        sock.recv(result.length)            # exactly the header; never the data behind it
    # NeedMore: wait for more bytes (under one deadline); ProxyHeaderError: close, count
    # error.reason

The encoders are the reference for the property tests and for sending headers upstream.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_V2", "PP2_TYPE_CRC32C", "REASONS", "V1_MAX_LENGTH", "V2_SIGNATURE",
    "Header", "NeedMore", "ProxyHeaderError", "crc32c", "encode_v1", "encode_v2", "parse",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN" + two full IPv6 addresses and ports + CRLF (spec 2.1)
DEFAULT_MAX_V2 = 4096
PP2_TYPE_CRC32C = 0x03

#: Every `ProxyHeaderError.reason`, for a metric's label set.
REASONS = ("signature", "version", "command", "family", "transport", "length", "too_long",
           "tlv", "crc", "v1_syntax")

_V2_FIXED = 16  # signature, ver_cmd, fam, len
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_COMMAND_CODES = {name: code for code, name in _COMMANDS.items()}
_FAMILIES = {0x0: socket.AF_UNSPEC, 0x1: socket.AF_INET, 0x2: socket.AF_INET6,
             0x3: socket.AF_UNIX}
_ADDR_BLOCK = {socket.AF_UNSPEC: 0, socket.AF_INET: 12, socket.AF_INET6: 36,
               socket.AF_UNIX: 216}
_UNSPEC, _STREAM = 0x0, 0x1
# What may follow "PROXY ": the token and the byte after it, checked as the bytes arrive.
_V1_PROTOCOLS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN\r", b"UNKNOWN ")
_V1_LINE = re.compile(rb"PROXY (TCP[46]) ([^ ]+) ([^ ]+) ([^ ]+) ([^ ]+)\r\n")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}")  # hex groups only: no dotted tail, no %scope
_LINE_END = re.compile(rb"[\r\n]")


class ProxyHeaderError(ValueError):
    """A connection did not start with a valid PROXY header.

    `reason` is a short machine word from `REASONS` (a metric label); `str(error)` is one
    sentence for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class NeedMore:
    """The buffer is a valid beginning of a header: read more and call `parse()` again.

    `needed` is how many more bytes at least before the answer can change: exact for the
    body of a v2 header, 1 while the signature, the fixed v2 part or a v1 line is being read
    (each byte is checked as it arrives, so garbage is rejected at its first wrong byte).
    """

    needed: int


@dataclass(frozen=True)
class Header:
    """A complete, valid PROXY header.

    version: 1 or 2. command: "PROXY" or "LOCAL" (v2 only; v1 is always "PROXY").
    family: AF_INET, AF_INET6, AF_UNIX or AF_UNSPEC (v1 "UNKNOWN" is AF_UNSPEC).
    source, destination: (host, port), or None when the caller must keep the real endpoints
    of the connection: LOCAL, AF_UNSPEC, AF_UNIX and v1 UNKNOWN.
    tlvs: the v2 TLVs as (type, value) pairs in wire order, a verified CRC32C one included.
    length: the exact number of header bytes to consume from the connection.
    """

    version: int
    command: str
    family: socket.AddressFamily
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        return next((value for t, value in self.tlvs if t == kind), None)


def parse(buf: bytes | bytearray | memoryview, max_v2: int = DEFAULT_MAX_V2) -> Header | NeedMore:
    """Parse the beginning of a connection as a PROXY header, version 1 or 2.

    `buf` holds the bytes received so far (they may go on past the header). `max_v2` bounds
    a v2 header's total size: its length field is checked against it before the body is read.
    Returns `NeedMore` or a `Header`; raises `ProxyHeaderError` for anything else.
    """
    head = bytes(buf[:1])
    if head == V2_SIGNATURE[:1]:
        return _parse_v2(buf, max_v2)
    if head == V1_SIGNATURE[:1]:
        return _parse_v1(bytes(buf[:V1_MAX_LENGTH]))
    if not head:
        return NeedMore(1)
    raise ProxyHeaderError("signature", f"not a PROXY header: first byte {head!r}")


def _check_prefix(data: bytes, expected: bytes, what: str) -> None:
    """Raise at the first byte of `data` that departs from `expected`."""
    for i, (got, want) in enumerate(zip(data, expected, strict=False)):
        if got != want:
            raise ProxyHeaderError(
                "signature", f"not a PROXY header: byte {i} of the {what} signature is "
                f"{bytes((got,))!r}, expected {bytes((want,))!r}")


# ---- version 2 -----------------------------------------------------------------------------

def _parse_v2(buf: bytes | bytearray | memoryview, max_v2: int) -> Header | NeedMore:
    fixed = bytes(buf[:_V2_FIXED])
    _check_prefix(fixed, V2_SIGNATURE, "version 2")
    if len(fixed) > 12:
        version, command = fixed[12] >> 4, _COMMANDS.get(fixed[12] & 0xF)
        if version != 2:
            raise ProxyHeaderError("version", f"PROXY header: unsupported version {version}")
        if command is None:
            raise ProxyHeaderError("command", f"PROXY v2 header: unknown command {fixed[12] & 0xF}")
    if len(fixed) > 13:
        family = _v2_family(command, fixed[13])
    if len(fixed) < _V2_FIXED:
        return NeedMore(1)
    total = _V2_FIXED + int.from_bytes(fixed[14:16], "big")
    if total > max_v2:
        raise ProxyHeaderError(
            "too_long", f"PROXY v2 header of {total} bytes is over the limit of {max_v2}")
    block = _ADDR_BLOCK[family]
    if total < _V2_FIXED + block:
        raise ProxyHeaderError(
            "length", f"PROXY v2 header: length {total - _V2_FIXED} is shorter than its "
            f"{block}-byte address block")
    if len(buf) < total:
        return NeedMore(total - len(buf))
    data = bytes(buf[:total])
    tlvs = _parse_tlvs(data, _V2_FIXED + block)
    source = destination = None
    if command == "PROXY" and family in (socket.AF_INET, socket.AF_INET6):
        source, destination = _v2_addresses(data, family)
    return Header(2, command, family, source, destination, tlvs, total)


def _v2_family(command: str, byte: int) -> socket.AddressFamily:
    family, transport = _FAMILIES.get(byte >> 4), byte & 0xF
    if family is None:
        raise ProxyHeaderError("family", f"PROXY v2 header: unknown address family {byte >> 4}")
    # A TCP proxy relays streams; UNSPEC is for a health check (LOCAL) or an unknown family.
    unspec_ok = command == "LOCAL" or family == socket.AF_UNSPEC
    if transport != _STREAM and not (transport == _UNSPEC and unspec_ok):
        raise ProxyHeaderError(
            "transport", f"PROXY v2 header: transport {transport} is not a stream")
    return family


def _parse_tlvs(data: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    """The TLVs from `pos` to the end of the header, which they must fill exactly; a CRC32C
    TLV is verified over the whole header with its value zeroed (spec 2.2.3)."""
    tlvs = []
    crc_at = None
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyHeaderError("tlv", "PROXY v2 header: a TLV is cut short by the length")
        kind, size = data[pos], int.from_bytes(data[pos + 1:pos + 3], "big")
        pos += 3
        if pos + size > len(data):
            raise ProxyHeaderError(
                "tlv", f"PROXY v2 header: TLV 0x{kind:02x} of {size} bytes overruns the header")
        if kind == PP2_TYPE_CRC32C:
            if size != 4 or crc_at is not None:
                raise ProxyHeaderError("tlv", "PROXY v2 header: malformed or repeated CRC32C TLV")
            crc_at = pos
        tlvs.append((kind, data[pos:pos + size]))
        pos += size
    if crc_at is not None:
        sent = int.from_bytes(data[crc_at:crc_at + 4], "big")
        if crc32c(data[:crc_at] + bytes(4) + data[crc_at + 4:]) != sent:
            raise ProxyHeaderError("crc", "PROXY v2 header: CRC32C checksum mismatch")
    return tuple(tlvs)


def _v2_addresses(data: bytes, family: socket.AddressFamily):
    size = 4 if family == socket.AF_INET else 16
    ip = ipaddress.IPv4Address if family == socket.AF_INET else ipaddress.IPv6Address
    pos = _V2_FIXED + 2 * size
    src_port, dst_port = struct.unpack_from("!HH", data, pos)
    return ((str(ip(data[_V2_FIXED:_V2_FIXED + size])), src_port),
            (str(ip(data[_V2_FIXED + size:pos])), dst_port))


# ---- version 1 -----------------------------------------------------------------------------

def _v1_error(line: bytes, why: str) -> ProxyHeaderError:
    return ProxyHeaderError("v1_syntax", f"PROXY v1 header {line[:V1_MAX_LENGTH]!r}: {why}")


def _parse_v1(data: bytes) -> Header | NeedMore:
    _check_prefix(data, V1_SIGNATURE, "version 1")
    end = _LINE_END.search(data)
    if end is not None and data[end.start():end.start() + 2] not in (b"\r", b"\r\n"):
        raise _v1_error(data, "a line must end with CRLF, not a lone CR or LF")
    rest = data[len(V1_SIGNATURE):]
    if rest and not any(rest[:len(p)] == p[:len(rest)] for p in _V1_PROTOCOLS):
        raise _v1_error(data, "the protocol must be TCP4, TCP6 or UNKNOWN")
    if end is None or end.end() == len(data):
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(
                "too_long", f"PROXY v1 header: no CRLF in the first {V1_MAX_LENGTH} bytes")
        return NeedMore(1)
    line = data[:end.end() + 1]
    if line.startswith(b"PROXY UNKNOWN"):
        # The spec has the receiver ignore whatever follows UNKNOWN up to the CRLF.
        return Header(1, "PROXY", socket.AF_UNSPEC, None, None, (), len(line))
    fields = _V1_LINE.fullmatch(line)
    if fields is None:
        raise _v1_error(line, "expected 'PROXY TCP4|TCP6 <src> <dst> <sport> <dport>' "
                              "with single spaces")
    proto, src, dst, sport, dport = fields.groups()
    family = socket.AF_INET if proto == b"TCP4" else socket.AF_INET6
    return Header(1, "PROXY", family, (_v1_address(line, src, family), _v1_port(line, sport)),
                  (_v1_address(line, dst, family), _v1_port(line, dport)), (), len(line))


def _v1_address(line: bytes, text: bytes, family: socket.AddressFamily) -> str:
    try:
        if family == socket.AF_INET and _V1_IPV4.fullmatch(text):
            return str(ipaddress.IPv4Address(text.decode()))
        if family == socket.AF_INET6 and _V1_IPV6.fullmatch(text):
            return str(ipaddress.IPv6Address(text.decode()))
    except ValueError:
        pass
    raise _v1_error(line, f"{text.decode('ascii', 'replace')!r} is not a canonical "
                          f"{'IPv4' if family == socket.AF_INET else 'IPv6'} address")


def _v1_port(line: bytes, text: bytes) -> int:
    if _V1_PORT.fullmatch(text) and int(text) <= 0xFFFF:
        return int(text)
    raise _v1_error(line, f"port {text.decode('ascii', 'replace')!r} is not a decimal in "
                          "0..65535 without leading zeros")


# ---- encoders ------------------------------------------------------------------------------

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_of(address) -> _IP | None:
    """The IP of a (host, port[, flow, scope]) tuple, IPv4-mapped IPv6 made IPv4 and a scope
    id dropped; None for what is not an IP address (an AF_UNIX path, None)."""
    if not isinstance(address, tuple | list) or len(address) < 2:
        return None
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return None
    if ip.version == 6:
        ip = ipaddress.IPv6Address(ip.packed)
        return ip.ipv4_mapped or ip
    return ip


def _endpoints(src, dst) -> tuple[_IP, int, _IP, int] | None:
    """Both endpoints in one family, or None when they cannot be written as TCP4/TCP6."""
    a, b = _ip_of(src), _ip_of(dst)
    if a is None or b is None:
        return None
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
                if ip.version == 4 else ip for ip in (a, b))
    ports = (src[1], dst[1])
    for port in ports:
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"not a TCP port: {port!r}")
    return a, ports[0], b, ports[1]


def _v1_text(ip: _IP) -> str:
    # Python 3.13 prints IPv4-mapped IPv6 dotted; the v1 line wants hex groups only.
    text = str(ip)
    if "." in text and ip.version == 6:
        return ":".join(ip.packed[i:i + 2].hex() for i in range(0, 16, 2))
    return text


def encode_v1(src, dst) -> bytes:
    """A v1 line for the connection from `src` to `dst`, each a (host, port) tuple as
    getpeername()/getsockname() give it.

    IPv4-mapped IPv6 addresses are written as IPv4; if the two endpoints are then of
    different families, both are written as IPv6 (the IPv4 one mapped). Endpoints that are
    not IP addresses (None, an AF_UNIX path) give "PROXY UNKNOWN".
    """
    ends = _endpoints(src, dst)
    if ends is None:
        return b"PROXY UNKNOWN\r\n"
    a, sport, b, dport = ends
    return f"PROXY TCP{a.version} {_v1_text(a)} {_v1_text(b)} {sport} {dport}\r\n".encode()


def encode_v2(src, dst, command: str = "PROXY", tlvs: Iterable[tuple[int, bytes]] | None = None,
              crc: bool = False) -> bytes:
    """A v2 header for the connection from `src` to `dst` (as for `encode_v1`, with the same
    IPv4-mapped and mixed-family rules).

    command "LOCAL" (a health check) writes no addresses. Endpoints that are not IP
    addresses give family AF_UNSPEC. `tlvs` are (type, value) pairs written in order; with
    `crc`, a PP2_TYPE_CRC32C TLV is appended last and filled with the header's checksum.
    """
    if command not in _COMMAND_CODES:
        raise ValueError(f"PROXY v2 command must be PROXY or LOCAL, not {command!r}")
    ends = _endpoints(src, dst) if command == "PROXY" else None
    if ends is None:
        fam, body = 0x00, b""
    else:
        a, sport, b, dport = ends
        fam = 0x11 if a.version == 4 else 0x21
        body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    pairs = list(tlvs or ())
    if crc:
        if any(kind == PP2_TYPE_CRC32C for kind, _ in pairs):
            raise ValueError("crc=True adds the CRC32C TLV itself")
        pairs.append((PP2_TYPE_CRC32C, bytes(4)))
    try:
        body += b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in pairs)
    except struct.error as error:
        raise ValueError(f"a TLV type must be 0..255 and its value 65535 bytes at most: {error}"
                         ) from None
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes is over 65535")
    header = V2_SIGNATURE + bytes((0x20 | _COMMAND_CODES[command], fam)) + struct.pack(
        "!H", len(body)) + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


# ---- CRC32C (Castagnoli, RFC 4960 appendix B) ------------------------------------------------

@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # reflected polynomial 0x1EDC6F41
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of `data`, continuing from a previous `crc` (0 to start)."""
    table = _crc32c_table()
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
