"""One relay, many listeners (Relay.listen per fd): each with its own upstream, tag, idle
timeout and splice setting; replaced in place for new clients; let go of one by one. For
both engines (ids c / py)."""

from __future__ import annotations

import socket
import time

import pytest
from test_relay import TIMEOUT, Chain, tcp_pair, wait_results
from test_relay_listen import Upstream


def _listener() -> socket.socket:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    return lsock


def _silent_upstream() -> socket.socket:
    """A listener the test accepts from itself."""
    upstream = _listener()
    upstream.settimeout(TIMEOUT)
    return upstream


def _roundtrip(lsock: socket.socket, payload: bytes = b"ping") -> bytes:
    """Send `payload`, half-close, return all the upstream's reply."""
    with socket.create_connection(lsock.getsockname(), timeout=TIMEOUT) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reply = b""
        while data := client.recv(65536):
            reply += data
    return reply


def _wait(pred, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_each_listener_goes_to_its_own_upstream(engine):
    up1, up2 = Upstream(1000), Upstream(2000)
    relay = engine(workers=2)
    l1, l2 = _listener(), _listener()
    try:
        relay.listen(l1.fileno(), socket.AF_INET, up1.addr, False, tag=1)
        relay.listen(l2.fileno(), socket.AF_INET, up2.addr, False, tag=2)
        assert len(_roundtrip(l1)) == 1000
        assert len(_roundtrip(l2)) == 2000
        assert len(_roundtrip(l1)) == 1000
        results = wait_results(relay, 3)
        assert sorted((r.tag, r.bytes_ba) for r in results) == [
            (1, 1000), (1, 1000), (2, 2000)]
        assert all(r.reason == "closed" for r in results)
    finally:
        relay.close()
        for s in (l1, l2):
            s.close()
        up1.close()
        up2.close()


def test_listening_again_replaces_the_settings_for_new_clients(engine):
    up1, up2 = Upstream(1000), Upstream(2000)
    relay = engine()
    lsock = _listener()
    try:
        relay.listen(lsock.fileno(), socket.AF_INET, up1.addr, False, tag=1)
        assert len(_roundtrip(lsock)) == 1000
        relay.listen(lsock.fileno(), socket.AF_INET, up2.addr, False, tag=2)
        assert len(_roundtrip(lsock)) == 2000
        assert sorted(r.tag for r in wait_results(relay, 2)) == [1, 2]
    finally:
        relay.close()
        lsock.close()
        up1.close()
        up2.close()


def test_letting_go_of_one_listener_keeps_the_others_and_their_pairs(engine):
    upstream = _silent_upstream()
    relay = engine(workers=2)
    l1, l2 = _listener(), _listener()
    try:
        relay.listen(l1.fileno(), socket.AF_INET, upstream.getsockname(), False, tag=7)
        relay.listen(l2.fileno(), socket.AF_INET, upstream.getsockname(), False, tag=8)
        _wait(lambda: relay.holds(l1.fileno()) and relay.holds(l2.fileno()), "listening")
        client = socket.create_connection(l1.getsockname(), timeout=TIMEOUT)
        served, _ = upstream.accept()
        _wait(lambda: relay.open_pairs(7) == 1, "the pair to be counted")
        relay.unlisten(l1.fileno())
        _wait(lambda: not relay.holds(l1.fileno()), "the workers to let go of l1")
        assert relay.holds(l2.fileno()) and relay.listening
        client.sendall(b"still open")  # the pair outlives its listener
        served.settimeout(TIMEOUT)
        assert served.recv(100) == b"still open"
        assert relay.open_pairs(7) == 1 and relay.open_pairs(8) == 0
        client.close()
        served.close()
        (result,) = wait_results(relay)
        assert (result.tag, result.reason) == (7, "closed")
        assert relay.open_pairs(7) == 0
        with socket.create_connection(l2.getsockname(), timeout=TIMEOUT):
            served, _ = upstream.accept()  # the other listener still serves
            served.close()
        relay.unlisten()
        _wait(lambda: not relay.listening, "the workers to let go of every listener")
    finally:
        relay.close()
        for s in (l1, l2, upstream):
            s.close()


def test_idle_timeout_per_listener_and_per_pair(engine):
    upstream = _silent_upstream()
    relay = engine(idle_timeout=0.0)
    quick, patient = _listener(), _listener()
    try:
        relay.listen(quick.fileno(), socket.AF_INET, upstream.getsockname(), False, tag=1,
                     idle_timeout=0.3)
        relay.listen(patient.fileno(), socket.AF_INET, upstream.getsockname(), False, tag=2)
        clients = [socket.create_connection(s.getsockname(), timeout=TIMEOUT)
                   for s in (quick, patient)]
        served = [upstream.accept()[0] for _ in clients]
        chain = Chain(relay, make=tcp_pair, conn_id=99)  # added with its own timeout below
        chain2 = Chain.__new__(Chain)
        chain2.left, mid_a = tcp_pair()
        mid_b, chain2.right = tcp_pair()
        relay.add(mid_a.detach(), mid_b.detach(), 100, tag=3, idle_timeout=0.3)
        results = wait_results(relay, 2)
        assert sorted((r.tag, r.reason) for r in results) == [(1, "timeout"), (3, "timeout")]
        time.sleep(0.5)
        assert relay.collect() == []  # the patient listener's pair and conn 99 stay open
        for c in clients + served:
            c.close()
        chain.close()
        chain2.close()
    finally:
        relay.close()
        for s in (quick, patient, upstream):
            s.close()


@pytest.mark.parametrize("side", [-2, 2, 5])
def test_an_mptcp_side_that_names_no_leg_is_refused(engine, side):
    """mptcp_side is -1 (none), 0 (the client) or 1 (the upstream): anything else made the
    compiled engine read past the pair's two sides (and the twin's pair stall)."""
    relay = engine()
    lsock = _listener()
    try:
        with pytest.raises(ValueError, match="mptcp_side"):
            relay.listen(lsock.fileno(), socket.AF_INET, ("127.0.0.1", 9), True, side)
        assert not relay.holds(lsock.fileno())
    finally:
        relay.close()
        lsock.close()


@pytest.mark.parametrize("bad", [-1, 1024])
def test_a_tag_out_of_range_is_refused(engine, bad):
    relay = engine()
    lsock = _listener()
    try:
        with pytest.raises(ValueError):
            relay.listen(lsock.fileno(), socket.AF_INET, ("127.0.0.1", 9), False, tag=bad)
        a, b = socket.socketpair()
        with pytest.raises(ValueError):
            relay.add(a.detach(), b.detach(), 1, tag=bad)
    finally:
        relay.close()
        lsock.close()
