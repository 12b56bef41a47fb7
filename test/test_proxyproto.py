"""The PROXY protocol parser and encoders (mptcpproxy/proxyproto.py): one test per rule of
HAProxy's proxy-protocol.txt that the parser enforces, vectors captured from HAProxy 2.6, and
property tests (hypothesis) with valid, split and mutated headers."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mptcpproxy.proxyproto import (
    PP2_TYPE_CRC32C,
    V2_SIGNATURE,
    Header,
    NeedMore,
    ProxyHeaderError,
    crc32c,
    encode_v1,
    encode_v2,
    parse,
)

# Bytes HAProxy 2.6.12 sent to a server (send-proxy-v2 proxy-v2-options crc32c,unique-id and
# send-proxy), each followed by the client's b"hello".
HAPROXY_V2_CRC = bytes.fromhex(
    "0d0a0d0a000d0a515549540a211100167f0000017f0000018e7ca50903000454cfa00905000068656c6c6f")
HAPROXY_V2_CRC_UID = bytes.fromhex(
    "0d0a0d0a000d0a515549540a2111001c7f0000017f0000018876a7650300041071f17d0500066162633132"
    "3368656c6c6f")
HAPROXY_V1_TCP6 = b"PROXY TCP6 ::1 ::1 42910 41217\r\nhello"


def rejected(data: bytes, reason: str, **kw) -> ProxyHeaderError:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


def v2(ver_cmd: int, fam: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A hand-made v2 header, for the malformed ones the encoder refuses to write."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", size) + body


INET_BLOCK = bytes((10, 0, 0, 1, 10, 0, 0, 2)) + struct.pack("!HH", 1234, 80)


# ---- CRC32C --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"123456789", 0xE3069283),
    (b"", 0),
    (bytes(32), 0x8A9136AA),                    # RFC 3720 B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
    assert crc32c(data) == expected
    assert crc32c(data[5:], crc32c(data[:5])) == expected  # continues from a previous value


# ---- signatures ----------------------------------------------------------------------------

@pytest.mark.parametrize("first", [b"G", b"\x16", b"\x00", b"S", b"\n"])
def test_plain_traffic_is_rejected_at_the_first_byte(first):
    error = rejected(first, "signature")
    assert "not a PROXY header" in str(error)
    rejected(first + b"ET / HTTP/1.1\r\n", "signature")


@pytest.mark.parametrize("signature", [V2_SIGNATURE, b"PROXY "])
def test_a_signature_prefix_needs_more_and_a_wrong_byte_is_rejected_at_once(signature):
    assert parse(b"") == NeedMore(1)
    for i in range(1, len(signature) + 1):
        assert parse(signature[:i]) == NeedMore(1)
    for i in range(1, len(signature)):
        error = rejected(signature[:i] + b"\x7f", "signature")
        assert f"byte {i}" in str(error)


def test_put_is_rejected_at_its_second_byte():
    rejected(b"PU", "signature")


# ---- version 2 -----------------------------------------------------------------------------

def test_v2_haproxy_headers_with_crc_and_unique_id():
    header = parse(HAPROXY_V2_CRC)
    assert header.length == len(HAPROXY_V2_CRC) - len(b"hello")
    assert (header.version, header.command, header.family) == (2, "PROXY", socket.AF_INET)
    assert header.source == ("127.0.0.1", 36476) and header.destination == ("127.0.0.1", 42249)
    header = parse(HAPROXY_V2_CRC_UID)
    assert header.tlv(0x05) == b"abc123" and len(header.tlv(PP2_TYPE_CRC32C)) == 4
    assert HAPROXY_V2_CRC_UID[header.length:] == b"hello"


@pytest.mark.parametrize("byte", [0x11, 0x31, 0xF1, 0x01])
def test_v2_version_nibble_must_be_2(byte):
    rejected(v2(byte, 0x11, INET_BLOCK), "version")
    rejected(v2(byte, 0x11, INET_BLOCK)[:13], "version")  # decided on that byte alone


@pytest.mark.parametrize("byte", [0x22, 0x2F])
def test_v2_command_must_be_local_or_proxy(byte):
    rejected(v2(byte, 0x11, INET_BLOCK)[:13], "command")


@pytest.mark.parametrize("fam", [0x41, 0xF1])
def test_v2_unknown_family_is_rejected(fam):
    rejected(v2(0x21, fam, INET_BLOCK)[:14], "family")


@pytest.mark.parametrize("ver_cmd, fam", [
    (0x21, 0x12), (0x21, 0x22), (0x20, 0x12),  # DGRAM, even for LOCAL
    (0x21, 0x10), (0x21, 0x30),                 # UNSPEC transport for a real family: PROXY
    (0x21, 0x13), (0x20, 0x0F),                 # unassigned transports
])
def test_v2_transport_must_be_stream(ver_cmd, fam):
    rejected(v2(ver_cmd, fam, bytes(216))[:14], "transport")


@pytest.mark.parametrize("ver_cmd, fam, body", [
    (0x21, 0x11, INET_BLOCK), (0x21, 0x21, bytes(36)), (0x21, 0x31, bytes(216)),
    (0x21, 0x00, b""), (0x21, 0x01, b""), (0x20, 0x00, b""), (0x20, 0x10, INET_BLOCK),
])
def test_v2_accepted_family_and_transport_pairs(ver_cmd, fam, body):
    assert isinstance(parse(v2(ver_cmd, fam, body)), Header)


def test_v2_length_over_the_limit_is_rejected_before_the_body_arrives():
    rejected(v2(0x21, 0x11, length=4096 - 16 + 1), "too_long")  # 16 bytes, no body
    assert parse(v2(0x21, 0x11, length=4096 - 16)) == NeedMore(4096 - 16)
    rejected(v2(0x21, 0x11, length=0xFFFF), "too_long")
    rejected(v2(0x21, 0x11, length=100), "too_long", max_v2=115)
    assert parse(v2(0x21, 0x11, INET_BLOCK), max_v2=28).length == 28


@pytest.mark.parametrize("fam, block", [(0x11, 12), (0x21, 36), (0x31, 216)])
def test_v2_length_shorter_than_the_address_block_is_rejected(fam, block):
    error = rejected(v2(0x21, fam, length=block - 1), "length")
    assert f"{block}-byte address block" in str(error)
    assert parse(v2(0x21, fam, length=block)) == NeedMore(block)
    rejected(v2(0x20, fam, length=block - 1), "length")  # LOCAL too: the block is there


@pytest.mark.parametrize("tail", [
    b"\x04", b"\x04\x00",            # a TLV header cut short by the length
    b"\x04\x00\x02\x00",             # a value overrunning the header
    b"\x04\x00\x00\x05\x00\x03ab",   # the second one overruns
])
def test_v2_tlvs_must_fill_the_remainder_exactly(tail):
    rejected(v2(0x21, 0x11, INET_BLOCK + tail) + b"application data", "tlv")


def test_v2_tlvs_are_returned_in_order():
    tlvs = ((0x01, b"h2"), (0x04, b""), (0x02, b"example.com"), (0x04, b"\0\0"))
    header = parse(encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=tlvs))
    assert header.tlvs == tlvs and header.tlv(0x02) == b"example.com" and header.tlv(9) is None


def test_v2_crc32c_is_verified():
    good = encode_v2(("192.0.2.1", 5000), ("192.0.2.2", 443), tlvs=[(0x02, b"a.example")],
                     crc=True)
    assert parse(good).tlv(PP2_TYPE_CRC32C) == good[-4:]
    crc_type_at = len(good) - 7  # changing the CRC TLV's type removes the check itself
    for i in set(range(16, len(good))) - {crc_type_at}:  # every byte of the body
        bad = good[:i] + bytes((good[i] ^ 0x40,)) + good[i + 1:]
        with pytest.raises(ProxyHeaderError) as info:
            parse(bad)
        assert info.value.reason in ("crc", "tlv"), (i, str(info.value))
    error = rejected(good[:20] + bytes((good[20] ^ 1,)) + good[21:], "crc")
    assert "CRC32C" in str(error)


@pytest.mark.parametrize("tail", [
    b"\x03\x00\x03abc",                                      # a CRC32C value must be 4 bytes
    b"\x03\x00\x04\0\0\0\0\x03\x00\x04\0\0\0\0",             # and appear once
])
def test_v2_malformed_crc32c_tlv_is_rejected(tail):
    rejected(v2(0x21, 0x11, INET_BLOCK + tail), "tlv")


@pytest.mark.parametrize("ver_cmd, fam, body", [
    (0x20, 0x00, b""), (0x20, 0x11, INET_BLOCK), (0x20, 0x21, bytes(36)),
    (0x21, 0x00, b""), (0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") * 2),
])
def test_v2_local_unspec_and_unix_keep_the_real_endpoints(ver_cmd, fam, body):
    header = parse(v2(ver_cmd, fam, body + b"\x04\x00\x00"))
    assert header.source is None and header.destination is None
    assert header.tlvs == ((0x04, b""),)


def test_v2_header_and_data_in_one_segment_consume_only_the_header():
    header = encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 443), tlvs=[(0x05, b"id")])
    result = parse(header + b"\x16\x03\x01 TLS hello", max_v2=len(header))
    assert result.length == len(header)
    assert result.source == ("2001:db8::1", 40000)
    assert parse(header[:16]) == NeedMore(len(header) - 16)  # exact: recv() that many
    assert parse(header[:-1]) == NeedMore(1)


# ---- version 1 -----------------------------------------------------------------------------

def test_v1_haproxy_line():
    header = parse(HAPROXY_V1_TCP6)
    assert (header.version, header.family, header.length) == (1, socket.AF_INET6, 32)
    assert header.source == ("::1", 42910) and header.destination == ("::1", 41217)


@pytest.mark.parametrize("line, family, source, destination", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", socket.AF_INET,
     ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", socket.AF_INET,
     ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:DB8::1 0000:0000:0000:0000:0000:0000:0000:0001 1 2\r\n", socket.AF_INET6,
     ("2001:db8::1", 1), ("::1", 2)),
    (b"PROXY UNKNOWN\r\n", socket.AF_UNSPEC, None, None),
    (b"PROXY UNKNOWN anything\there \x00\xff up to CRLF\r\n", socket.AF_UNSPEC, None, None),
])
def test_v1_valid_lines(line, family, source, destination):
    header = parse(line + b"SSH-2.0-client\r\n")
    assert (header.version, header.command, header.family) == (1, "PROXY", family)
    assert (header.source, header.destination, header.length) == (source, destination, len(line))


def test_v1_line_of_107_bytes_is_the_longest():
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == 107 and parse(worst).length == 107
    longest_tcp6 = worst.replace(b"UNKNOWN", b"TCP6")
    assert len(longest_tcp6) == 104 and parse(longest_tcp6).family == socket.AF_INET6
    rejected(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "too_long")  # 108 bytes
    rejected(b"PROXY UNKNOWN " + b"x" * 93, "too_long")            # 107 without CRLF
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) == NeedMore(1)     # 106: may still end
    rejected(b"PROXY UNKNOWN " + b"x" * 92 + b"\r", "too_long")    # its LF would be byte 108


@pytest.mark.parametrize("data", [
    b"PROXY UNKNOWN\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"PROXY UNKNOWN\rX\r\n",
    b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
])
def test_v1_line_must_end_with_crlf(data):
    error = rejected(data, "v1_syntax")
    assert "CRLF" in str(error)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",        # double space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1  2\r\n",
    b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",        # tab
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",        # trailing space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",           # a field missing
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",       # one too many
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",        # leading-zero port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",     # port over 65535
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",        # leading-zero octet
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",             # address of the other family
    b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n",      # dotted tail: hex groups only
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",        # scope id
    b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    b"PROXY TCP6 12345::1 ::1 1 2\r\n",
    b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n",  # non-ASCII digit
])
def test_v1_strict_syntax(line):
    rejected(line, "v1_syntax")


@pytest.mark.parametrize("start", [b"PROXY X", b"PROXY tcp4", b"PROXY TCP5", b"PROXY TCP4\t",
                                   b"PROXY UNKNOWNX", b"PROXY  UNKNOWN"])
def test_v1_protocol_is_checked_as_it_arrives(start):
    rejected(start, "v1_syntax")


def test_v1_header_and_data_in_one_segment_consume_only_the_line():
    line = b"PROXY TCP4 203.0.113.9 198.51.100.1 51000 25\r\n"
    data = b"EHLO client\r\n" + b"x" * 200
    assert parse(line + data).length == len(line)
    assert parse(line[:-1]) == NeedMore(1)


# ---- encoders ------------------------------------------------------------------------------

def test_encoders_match_haproxy_bytes():
    assert encode_v1(("::1", 42910, 0, 0), ("::1", 41217, 0, 0)) == HAPROXY_V1_TCP6[:-5]
    # the example in proxy-protocol.txt's era: haproxy send-proxy-v2 without TLVs
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == bytes.fromhex(
        "0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")


def test_encoders_write_ipv4_mapped_as_ipv4():
    src, dst = ("::ffff:1.2.3.4", 1000, 0, 0), ("::ffff:5.6.7.8", 80, 0, 0)
    assert encode_v1(src, dst) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\r\n"
    header = parse(encode_v2(src, dst))
    assert header.family == socket.AF_INET and header.source == ("1.2.3.4", 1000)


def test_encoders_write_mixed_families_as_ipv6():
    src, dst = ("::ffff:1.2.3.4", 1000), ("2001:db8::1", 80)
    line = encode_v1(src, dst)
    assert line.startswith(b"PROXY TCP6 ") and b"." not in line  # hex groups, not dotted
    for header in (parse(line), parse(encode_v2(src, dst))):
        assert header.family == socket.AF_INET6
        assert ipaddress.ip_address(header.source[0]).ipv4_mapped == ipaddress.ip_address(
            "1.2.3.4")
        assert header.destination == ("2001:db8::1", 80)


def test_encode_v1_keeps_mapped_ipv6_in_hex_where_python_prints_it_dotted(monkeypatch):
    plain = ipaddress.IPv6Address.__str__  # Python 3.13 prints ::ffff:1.2.3.4 dotted
    monkeypatch.setattr(ipaddress.IPv6Address, "__str__", lambda ip: (
        f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped else plain(ip)))
    line = encode_v1(("1.2.3.4", 1), ("2001:db8::1", 2))
    assert line == b"PROXY TCP6 0000:0000:0000:0000:0000:ffff:0102:0304 2001:db8::1 1 2\r\n"
    assert parse(line).length == len(line)


def test_encoders_drop_a_scope_id():
    assert encode_v1(("fe80::1%lo", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize("src, dst", [(None, ("1.2.3.4", 80)), ("/run/x.sock", "/run/y.sock"),
                                      (("", 0), ("1.2.3.4", 80))])
def test_encoders_write_unknown_for_what_is_not_ip(src, dst):
    assert encode_v1(src, dst) == b"PROXY UNKNOWN\r\n"
    header = parse(encode_v2(src, dst))
    assert (header.command, header.family, header.source) == ("PROXY", socket.AF_UNSPEC, None)


def test_encode_v2_local_and_bad_arguments():
    local = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="LOCAL")
    assert local == V2_SIGNATURE + b"\x20\x00\x00\x00"
    with pytest.raises(ValueError):
        encode_v2(None, None, command="HEALTH")
    with pytest.raises(ValueError):
        encode_v2(None, None, tlvs=[(PP2_TYPE_CRC32C, bytes(4))], crc=True)
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 70000), ("5.6.7.8", 2))
    for tlvs in ([(4, bytes(0xFFFF))], [(4, bytes(0x10000))], [(256, b"")]):
        with pytest.raises(ValueError):
            encode_v2(None, None, tlvs=tlvs)


# ---- properties ----------------------------------------------------------------------------

_V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address).filter(
    lambda ip: ip.ipv4_mapped is None)
_PORT = st.integers(0, 65535)
# (what the encoder is given, the IP it must come back as before any mixed-family mapping)
_ENDPOINT = st.one_of(
    st.tuples(_V4, _PORT).map(lambda t: ((str(t[0]), t[1]), t[0], t[1])),
    st.tuples(_V6, _PORT).map(lambda t: ((str(t[0]), t[1], 0, 0), t[0], t[1])),
    st.tuples(_V4, _PORT).map(lambda t: ((f"::ffff:{t[0]}", t[1]), t[0], t[1])),
    st.just((None, None, None)),
)
_TLVS = st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C),
                           st.binary(max_size=40)), max_size=4)


def _expected(src, dst):
    """(family, source, destination) as the parser must report them."""
    (_, a, sport), (_, b, dport) = src, dst
    if a is None or b is None:
        return socket.AF_UNSPEC, None, None
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
                if ip.version == 4 else ip for ip in (a, b))
    family = socket.AF_INET if a.version == 4 else socket.AF_INET6
    return family, (a, sport), (b, dport)


def _as_ips(endpoint):
    return None if endpoint is None else (ipaddress.ip_address(endpoint[0]), endpoint[1])


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from([1, 2]), src=_ENDPOINT, dst=_ENDPOINT, local=st.booleans(),
       tlvs=_TLVS, crc=st.booleans(), data=st.binary(max_size=64),
       steps=st.lists(st.integers(1, 40), min_size=1, max_size=50))
def test_property_valid_headers_split_anywhere(version, src, dst, local, tlvs, crc, data, steps):
    if version == 1:
        header = encode_v1(src[0], dst[0])
        tlvs, crc, local = [], False, False
    else:
        header = encode_v2(src[0], dst[0], command="LOCAL" if local else "PROXY", tlvs=tlvs,
                           crc=crc)
    stream = header + data
    seen, steps = 0, iter(steps)
    while True:  # partial reads: the growing prefix, as MSG_PEEK would show it
        seen = min(len(stream), seen + next(steps, len(stream)))
        result = parse(stream[:seen])
        if not isinstance(result, NeedMore):
            break
        assert seen < len(header) and seen + result.needed <= len(header)
    assert seen >= len(header) and result.length == len(header)
    family, source, destination = _expected(src, dst)
    if local:
        assert (result.command, result.source, result.destination) == ("LOCAL", None, None)
    else:
        assert (result.version, result.command, result.family) == (version, "PROXY", family)
        assert (_as_ips(result.source), _as_ips(result.destination)) == (source, destination)
    assert [t for t in result.tlvs if t[0] != PP2_TYPE_CRC32C] == tlvs
    assert (result.tlv(PP2_TYPE_CRC32C) is not None) == crc


_VALID = st.one_of(
    st.builds(lambda s, d: encode_v1(s[0], d[0]), _ENDPOINT, _ENDPOINT),
    st.builds(lambda s, d, cmd, t, c: encode_v2(s[0], d[0], cmd, t, c), _ENDPOINT, _ENDPOINT,
              st.sampled_from(["PROXY", "LOCAL"]), _TLVS, st.booleans()),
)
_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 200), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.integers(0, 255)),
)


def _mutate(data: bytes, mutations) -> bytes:
    for kind, where, value in mutations:
        i = where % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data = data[:i] + bytes((data[i] ^ value,)) + data[i + 1:]
        elif kind == "cut":
            data = data[:i]
        elif kind == "insert":
            data = data[:i] + bytes((value,)) + data[i:]
    return data


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_VALID, data=st.binary(max_size=32), mutations=st.lists(_MUTATION, max_size=4),
       max_v2=st.sampled_from([4096, 64, 16]))
def test_property_mutated_headers_never_crash_or_overread(header, data, mutations, max_v2):
    stream = _mutate(header + data, mutations)
    try:
        result = parse(stream, max_v2=max_v2)
    except ProxyHeaderError as error:
        assert str(error) and error.reason
        event(f"rejected: {error.reason}")
        return
    event(type(result).__name__)
    if isinstance(result, NeedMore):
        assert result.needed >= 1
        return
    assert 0 < result.length <= len(stream)
    assert parse(stream[:result.length], max_v2=max_v2) == result  # bytes past it unused
    assert result.version == 2 or result.length <= 107


@settings(max_examples=500, deadline=None)
@given(start=st.sampled_from([b"", V2_SIGNATURE, V2_SIGNATURE + b"\x21", b"PROXY ",
                              b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
       noise=st.binary(max_size=300))
def test_property_random_bytes_never_crash(start, noise):
    try:
        result = parse(start + noise)
    except ProxyHeaderError:
        return
    assert isinstance(result, NeedMore) or result.length <= len(start + noise)
