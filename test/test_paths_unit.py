"""Per-path accounting without namespaces: the engines fold canned MPTCP_FULL_INFO answers
(built here from the kernel's layouts, see NOTES-mptcp.md) as they fold real ones; the
connection-end line and the JSON fields; the bounded labels of the path metrics."""

from __future__ import annotations

import json
import logging
import pickle
import random
import socket
import struct

import pytest

from mptcpproxy import connlog
from mptcpproxy.pathmetrics import OTHER, PathCollector, PathLabels, own_addresses
from mptcpproxy.relay._results import MAX_PATHS, PathStat, Result

ESTABLISHED, SYN_SENT, CLOSE = 1, 2, 7


def _sockaddr(addr: tuple[str, int]) -> bytes:
    host, port = addr
    if ":" in host:
        raw = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
               + socket.inet_pton(socket.AF_INET6, host))
    else:
        raw = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
               + socket.inet_pton(socket.AF_INET, host))
    return raw.ljust(128, b"\0")


def sf(sid: int, local: tuple, remote: tuple, *, sent: int = 0, received: int = 0,
       retrans: int = 0, acked: int = 0, rtt: int = 10000, state: int = ESTABLISHED) -> dict:
    return dict(id=sid, local=local, remote=remote, sent=sent, received=received,
                retrans=retrans, acked=acked, rtt=rtt, state=state)


def answer(subflows: list[dict], sent: int = 0, received: int = 0, retrans: int = 0,
           acked: int = 0) -> tuple[bytes, bytes, bytes]:
    """MPTCP_FULL_INFO as the kernel fills it: struct mptcp_full_info (136 B, struct
    mptcp_info at 40), the mptcp_subflow_info array (264 B each: id, then the local and
    remote sockaddr_storage at 8 and 136) and the tcp_info array (216 B each)."""
    head = struct.pack("=6I2Q", 280, 216, 264, 264, len(subflows), 16, 0, 0)
    info = bytearray(96)
    info[0] = max(len(subflows) - 1, 0)
    struct.pack_into("=4Q", info, 48, retrans, sent, received, acked)
    sfi = b"".join(struct.pack("=II", s["id"], 0) + _sockaddr(s["local"]) + _sockaddr(s["remote"])
                   for s in subflows)
    tcpi = b""
    for s in subflows:
        t = bytearray(216)
        t[0] = s["state"]
        struct.pack_into("=I", t, 68, s["rtt"])
        struct.pack_into("=QQ", t, 120, s["acked"], s["received"])
        struct.pack_into("=QQ", t, 200, s["sent"], s["retrans"])
        tcpi += bytes(t)
    assert len(head + info) == 136 and len(sfi) == 264 * len(subflows)
    return head + bytes(info), sfi, tcpi


@pytest.fixture(params=["c", "py"])
def fold(request):
    if request.param == "c":
        from mptcpproxy.relay._relay import _fold_samples
        return _fold_samples
    from mptcpproxy.relay._relay_py_paths import fold_samples
    return fold_samples


A, B = ("10.0.1.1", 40000), ("10.0.1.2", 4444)
C, D = ("10.0.2.1", 40001), ("10.0.2.2", 4444)


def test_two_subflows_keep_their_last_sample(fold):
    first = answer([sf(1, A, B, sent=1000, acked=900, rtt=4000),
                    sf(2, C, D, sent=500, acked=400, received=7, rtt=30000)],
                   sent=1300, acked=1300, received=7)
    second = answer([sf(1, A, B, sent=6000, acked=5901, retrans=100, rtt=5000),
                     sf(2, C, D, sent=4000, acked=4000, received=9, rtt=40000),
                     sf(3, A, D, state=SYN_SENT)],  # a join under way: not established
                    sent=9800, acked=9901, received=9, retrans=64)
    counts, paths, totals, by_addr, reinjected = fold([first, second])
    assert counts == [2, 2]
    assert paths == (
        PathStat(1, A, B, 6000, 0, 100, 5000, False, 5901),
        PathStat(2, C, D, 4000, 9, 0, 40000, False, 4000),
        PathStat(3, A, D, 0, 0, 0, 10000, False, 0),
    )
    assert totals == (9800, 9, 64) and reinjected == 64
    # per local address: the acknowledged bytes sent, received, retransmitted
    assert by_addr["10.0.1.1"][:3] == [5901, 0, 100]
    assert by_addr["10.0.2.1"][:3] == [4000, 9, 0]
    # RTT observations of established subflows: 4 ms and 5 ms (<= 5 ms), 30 and 40 ms
    assert sum(by_addr["10.0.1.1"][3:-1]) == 2 and by_addr["10.0.1.1"][-1] == pytest.approx(0.009)
    assert sum(by_addr["10.0.2.1"][3:-1]) == 2


def test_the_one_subflow_removed_between_samples_gets_what_it_moved_since(fold):
    both = answer([sf(1, A, B, acked=1000), sf(2, C, D, acked=1000)], acked=2000)
    # subflow 2 gone (REMOVE_ADDR): the connection acked 1500 more, subflow 1 shows 1000
    one = answer([sf(1, A, B, acked=2000)], acked=3500)
    _, paths, *_ = fold([both, one])
    assert [(p.id, p.bytes_acked, p.closed) for p in paths] == [(1, 2000, False),
                                                                 (2, 1500, True)]


def test_a_reset_keeps_the_last_sample_and_the_totals(fold):
    # after a fast close the kernel lists one empty entry; the connection totals survive
    before = answer([sf(1, A, B, sent=100, acked=100), sf(2, C, D, sent=50, acked=50)],
                    sent=150, acked=150)
    after = answer([sf(0, ("0.0.0.0", 0), ("0.0.0.0", 0), state=CLOSE)], sent=400,
                   acked=170, received=3)
    counts, paths, totals, _, _ = fold([before, after])
    assert counts == [2, 0]
    assert paths == (
        PathStat(1, A, B, 100, 0, 0, 10000, True, 100),
        PathStat(2, C, D, 50, 0, 0, 10000, True, 50),
        # two vanished: what they moved since goes to "closed subflows"
        PathStat(0, ("", 0), ("", 0), 20, 3, 0, 0, True, 20),
    )
    assert totals == (400, 3, 0)


def test_addresses_ipv6_and_ipv4_mapped(fold):
    v6, mapped = ("2001:db8::1", 5000), ("::ffff:10.0.3.1", 5001)
    _, paths, _, by_addr, _ = fold([answer([sf(1, v6, ("2001:db8::2", 80), acked=5),
                                            sf(2, mapped, ("::ffff:10.0.3.2", 80))])])
    assert [(p.local, p.remote) for p in paths] == [
        (v6, ("2001:db8::2", 80)), (("10.0.3.1", 5001), ("10.0.3.2", 80))]
    assert set(by_addr) == {"2001:db8::1", "10.0.3.1"}


def test_the_kernels_most_subflows_are_all_listed_open(fold):
    # net.mptcp limits allow 8 subflows besides the first: 9 at once, none folded away
    nine = answer([sf(i, A, B, acked=10) for i in range(1, 10)], acked=90)
    _, paths, *_ = fold([nine])
    assert [(p.id, p.closed) for p in paths] == [(i, False) for i in range(1, 10)]


def test_at_most_max_paths_subflows_are_kept(fold):
    first = answer([sf(i, A, B, acked=10) for i in range(1, MAX_PATHS + 1)],
                   acked=10 * MAX_PATHS)
    # the first one closes (gone), a new one takes its place; then one more opens while
    # all kept ones are open: it is counted in "closed subflows"
    second = answer([sf(i, A, B, acked=10) for i in range(2, MAX_PATHS + 2)],
                    acked=10 * MAX_PATHS + 10)
    third = answer([sf(i, A, B, acked=10) for i in range(2, MAX_PATHS + 3)],
                   acked=10 * MAX_PATHS + 20)
    counts, paths, *_ = fold([first, second, third])
    assert counts == [MAX_PATHS, MAX_PATHS, MAX_PATHS + 1]
    assert [p.id for p in paths] == [MAX_PATHS + 1, *range(2, MAX_PATHS + 1), 0]
    assert paths[-1].bytes_acked == 10 + 10  # the replaced first one and the untracked one


# -- the connection-end line and the JSON fields ------------------------------------------

def _result(paths: tuple, **kw) -> Result:
    return Result(7, 1000, 20, 1.5, "closed", 0, True, len(paths), None, 0, paths,
                  kw.get("sent", 1000), kw.get("received", 20), kw.get("retrans", 3))


def test_the_end_line_gives_each_paths_share(caplog):
    paths = (PathStat(1, A, B, 700, 10, 5, 4000, True, 590),
             PathStat(2, C, D, 500, 10, 0, 9000, True, 410),
             PathStat(0, ("", 0), ("", 0), 0, 0, 0, 0, True, 0))
    with caplog.at_level(logging.INFO, logger="mptcpproxy"):
        connlog.log_end(_result(paths), connlog.Conn(("10.9.0.1", 5000), B, True))
    (record,) = caplog.records
    assert record.getMessage().endswith(
        "mptcp=yes subflows=3 paths=10.0.1.1>10.0.1.2 59%,10.0.2.1>10.0.2.2 41%")
    fields = json.loads(json.dumps(record.paths))
    assert fields[0] == {"id": 1, "local": "10.0.1.1:40000", "remote": "10.0.1.2:4444",
                         "bytes_sent": 700, "bytes_received": 10, "bytes_retrans": 5,
                         "bytes_acked": 590, "rtt_us": 4000, "closed": True}
    assert fields[2]["local"] is None
    assert (record.mptcp_bytes_sent, record.mptcp_bytes_received,
            record.mptcp_bytes_retrans) == (1000, 20, 3)


def _end_line(caplog, paths: tuple, sent: int) -> str:
    """The end line log_end() writes for a client proxy's pair with these paths."""
    with caplog.at_level(logging.INFO, logger="mptcpproxy"):
        connlog.log_end(_result(paths, sent=sent), connlog.Conn(C, B, True))
    return caplog.records[0].getMessage()


def test_closed_subflows_are_named_only_when_they_carried_a_share(caplog):
    """After both DATA_FINs the kernel may close the subflows before the last sample: the
    DATA_FIN's acknowledgement (one byte) goes to "closed subflows", which the line leaves
    out at 0 % (the JSON fields keep it); bytes that count are named."""
    stray = (PathStat(1, A, B, 6000, 0, 0, 4000, True, 6000),
             PathStat(2, C, D, 4000, 0, 0, 9000, True, 4000),
             PathStat(0, ("", 0), ("", 0), 1, 0, 0, 0, True, 1))
    assert _end_line(caplog, stray, sent=10001).endswith(
        "paths=10.0.1.1>10.0.1.2 60%,10.0.2.1>10.0.2.2 40%")
    caplog.clear()
    missed = (*stray[:2], PathStat(0, ("", 0), ("", 0), 5000, 0, 0, 0, True, 5000))
    assert _end_line(caplog, missed, sent=15000).endswith(
        "paths=10.0.1.1>10.0.1.2 40%,10.0.2.1>10.0.2.2 27%,closed subflows 33%")


def test_a_receiving_proxy_shares_by_bytes_received(caplog):
    paths = (PathStat(1, ("2001:db8::2", 4444), ("2001:db8::1", 5000), 0, 300, 0, 1, True, 1),
             PathStat(2, D, C, 0, 100, 0, 1, True, 1))
    assert _end_line(caplog, paths, sent=0).endswith(
        "paths=[2001:db8::2]>[2001:db8::1] 75%,10.0.2.2>10.0.2.1 25%")


def test_a_download_shares_by_the_bytes_received(caplog):
    """A client proxy relaying a download (iperf3 -R, HTTP): it sent 37 B of request and
    received 29 MB over 60/40 paths. The shares are those of the bytes received, the
    direction that carried the traffic (before: 97 %/3 %, the request's split)."""
    paths = (PathStat(1, A, B, 37, 17_400_000, 0, 4000, True, 38),
             PathStat(2, C, D, 0, 11_600_000, 0, 9000, True, 1))
    assert _end_line(caplog, paths, sent=37).endswith(
        "paths=10.0.1.1>10.0.1.2 60%,10.0.2.1>10.0.2.2 40%")


def _random_samples(rng: random.Random) -> list[tuple[bytes, bytes, bytes]]:
    """One connection's samples: subflows come and go (closed ones, "closed subflows"),
    IPv4, IPv6 and IPv4-mapped addresses, counts that make shares of exactly N.5 %."""
    hosts = [("10.0.1.1", 1), ("10.0.2.1", 2), ("2001:db8::1", 3), ("::ffff:10.0.3.1", 4)]
    counts = [0, 1, 3, 5, 197, 199, 200, 1 << 20, rng.randrange(1 << 50)]
    grown = {}  # subflow id -> its counters, which only grow
    samples, total = [], 0
    for _ in range(rng.randint(1, 3)):
        listed = []
        for sid in rng.sample(range(1, 12), rng.randint(1, 4)):
            last = grown.setdefault(sid, [0, 0, 0])
            for k in range(3):
                last[k] += rng.choice(counts)
            local, remote = hosts[sid % 4], hosts[(sid + 1) % 4]
            listed.append(sf(sid, local, remote, sent=last[0], acked=last[1],
                             received=last[2]))
        total += rng.choice(counts)
        samples.append(answer(listed, acked=sum(v[1] for v in grown.values()) + total,
                              received=sum(v[2] for v in grown.values())))
    return samples


def test_the_engines_paths_text_follows_the_end_lines_rule():
    """The compiled engine formats the paths= text itself (Result.paths.text): it is the
    text connlog's rule gives for the same paths (the twin's Results use the rule)."""
    from mptcpproxy.relay._relay import _fold_samples
    rng = random.Random(13)
    checked = 0
    for _ in range(400):
        _, paths, *_ = _fold_samples(_random_samples(rng))
        if paths:
            assert paths.text == connlog.paths_text(tuple(paths)), tuple(paths)
            checked += 1
    assert checked > 300
    assert connlog.percent(1, 200) == 0 and connlog.percent(3, 200) == 2  # halves to even


def test_the_engines_paths_are_a_sequence_of_pathstat(caplog):
    from mptcpproxy.relay._relay import _fold_samples
    _, paths, *_ = _fold_samples([answer([sf(1, A, B, acked=60), sf(2, C, D, acked=40)],
                                         acked=100)])
    items = tuple(paths)
    assert len(paths) == 2 and paths[1] == items[1] and paths[-1:] == items[-1:]
    assert paths == items and items == tuple(paths) and hash(paths) == hash(items)
    assert repr(paths) == repr(items) and pickle.loads(pickle.dumps(paths)) == items
    # the end line and its JSON fields are those of the same paths as a tuple
    with caplog.at_level(logging.INFO, logger="mptcpproxy"):
        connlog.log_end(_result(paths), connlog.Conn(C, B, True))
        connlog.log_end(_result(items), connlog.Conn(C, B, True))
    engine, rule = caplog.records
    assert engine.getMessage() == rule.getMessage()
    assert engine.getMessage().endswith("paths=10.0.1.1>10.0.1.2 60%,10.0.2.1>10.0.2.2 40%")
    assert engine.paths == rule.paths


def test_no_paths_no_paths_field(caplog):
    with caplog.at_level(logging.INFO, logger="mptcpproxy"):
        connlog.log_end(_result(()), connlog.Conn(C, B, True))
    assert caplog.records[0].getMessage().endswith("mptcp=yes subflows=0")
    assert caplog.records[0].paths == []


# -- bounded labels ----------------------------------------------------------------------

def test_labels_are_the_hosts_own_addresses_at_most_16():
    own = {f"10.0.0.{i}" for i in range(1, 21)}
    labels = PathLabels(lambda: own)
    rows = {f"10.1.{i // 250}.{i % 250}": [1, 1, 0] + [0] * 13 + [0.0] for i in range(200)}
    rows.update({a: [1, 0, 0] + [0] * 13 + [0.0] for a in own})
    rows[None] = [5, 0, 0] + [0] * 13 + [0.0]
    collector = PathCollector(lambda: (rows, 42), labels)
    families = {f.name: f for f in collector.collect()}
    values = {s.labels["local"] for s in families["mptcpproxy_path_bytes"].samples}
    assert len(values) == 17 and OTHER in values and values - {OTHER} <= own
    sent_other = sum(s.value for s in families["mptcpproxy_path_bytes"].samples
                     if s.labels == {"direction": "sent", "local": OTHER})
    assert sent_other == 200 + 4 + 5  # the foreign ones, own ones past 16, past the engine's
    assert families["mptcpproxy_mptcp_reinjected_bytes"].samples[0].value == 42


def test_own_addresses_include_loopback():
    assert "127.0.0.1" in own_addresses()


def test_an_address_the_host_gains_between_two_scrapes_gets_its_own_label():
    """A path comes up after the proxy started (a second link, a mobile one): its address
    carries subflows at the next scrape, however soon, and is labelled as the host's own
    (before: "other" for good when the scrape came within 10 s of the last read)."""
    own = {"10.0.0.1"}
    row = [1, 1, 0] + [0] * 13 + [0.0]
    rows = {"10.0.0.1": row}
    collector = PathCollector(lambda: (rows, 0), PathLabels(lambda: set(own)))

    def values() -> set:
        families = {f.name: f for f in collector.collect()}
        return {s.labels["local"] for s in families["mptcpproxy_path_bytes"].samples}

    assert values() == {"10.0.0.1"}
    own.add("10.0.0.2")
    rows["10.0.0.2"] = row
    assert values() == {"10.0.0.1", "10.0.0.2"}
