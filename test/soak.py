"""The soak test's traffic, run as processes inside the test namespaces.

    python soak.py serve PORT
        the service (dual-stack on ``::``): each connection starts with a JSON header line
        saying what to do with it (echo, sink or source); one JSON line per connection on
        stdout with what it saw: ``{"id", "kind", "expect", "outcome"}``
    python soak.py drive --ports P,Q --seconds S --label L [--idle-timeout T] [--once]
        sessions of mixed kinds through the proxies on 127.0.0.1:P and :Q, several at a time,
        started until S seconds are over; one last JSON line with the counts, the session
        ids and the failures. --once: one 4 MiB echo per port, nothing else.

Every stream is pseudo-random from a seed both ends know, and what arrives is sha256-checked
against it: a stream that ends early with a clean EOF is a truncation, never a success.
Every socket call has a timeout.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from collections import Counter

from soakstream import (
    CHUNK,
    TIMEOUT,
    MiB,
    Tally,
    abort,
    duplex,
    emit,
    read_to_eof,
    send_stream,
    stream,
)

STALL = 1.5  # a receiver that stops reading for this long, then resumes (under the idle timeout)


# -- the service ------------------------------------------------------------------------


def read_header(sock: socket.socket) -> tuple[dict, bytes]:
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(4096)
        if not data or len(buf) > 4096:
            raise EOFError(f"no header line (got {len(buf)} B, then EOF)")
        buf += data
    line, rest = buf.split(b"\n", 1)
    return json.loads(line), rest


def serve_echo(sock: socket.socket, head: dict, data: bytes) -> str:
    tally = Tally(head["seed"])
    while data or (data := sock.recv(CHUNK)):
        tally.add(data)
        sock.sendall(data)
        data = b""
    sock.shutdown(socket.SHUT_WR)
    return tally.verdict(head["size"])


def serve_sink(sock: socket.socket, head: dict, data: bytes) -> str:
    time.sleep(head.get("stall", 0))  # a service that is slow to read: backpressure
    tally = Tally(head["seed"])
    tally.add(data)
    read_to_eof(sock, tally)
    verdict = tally.verdict(head["size"])
    sock.sendall(json.dumps({"outcome": verdict}).encode() + b"\n")
    return verdict


def serve_source(sock: socket.socket, head: dict, data: bytes) -> str:
    rst_at = head.get("rst_at")
    send_stream(sock, head["seed"], head["size"] if rst_at is None else rst_at)
    if rst_at is not None:
        abort(sock)
        return "ok"
    sock.shutdown(socket.SHUT_WR)  # the service half-closes first; the client sends after
    tally = Tally(head["seed"] + 1)
    tally.add(data)
    read_to_eof(sock, tally)
    return tally.verdict(head.get("up", 0))


SERVICES = {"echo": serve_echo, "sink": serve_sink, "source": serve_source}


def handle(conn: socket.socket) -> None:
    rec: dict = {"id": None}
    try:
        with conn:
            conn.settimeout(TIMEOUT)
            head, rest = read_header(conn)
            rec.update(id=head["id"], kind=head["kind"], expect=head.get("expect", "ok"))
            rec["outcome"] = SERVICES[head["kind"]](conn, head, rest)
    except (ConnectionResetError, BrokenPipeError):
        rec["outcome"] = "reset"
    except Exception as exc:  # the record says what went wrong; the service carries on
        rec["outcome"] = f"error: {exc!r}"
    emit(rec)


def serve(port: int) -> int:
    lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("::", port))
    lsock.listen(1024)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- the driver: sessions through the proxies -------------------------------------------


def header(sock: socket.socket, sid: str, kind: str, **fields: object) -> None:
    sock.sendall(json.dumps({"id": sid, "kind": kind, **fields}).encode() + b"\n")


def pick_size(rng: random.Random) -> int:
    return rng.choice([0, 1, rng.randrange(1, 65536), rng.randrange(1, 4 * MiB)])


def echo_both_ways(sock: socket.socket, sid: str, size: int, seed: int) -> str:
    header(sock, sid, "echo", size=size, seed=seed)
    tally = Tally(seed)
    duplex(sock, stream(seed, size), tally)
    return tally.verdict(size)


def bulk(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """Both ways at once through the echo; the client half-closes first."""
    return echo_both_ways(sock, sid, pick_size(rng), rng.getrandbits(32))


def last(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """The proxies still serve: 4 MiB through the echo (--once)."""
    return echo_both_ways(sock, sid, 4 * MiB, rng.getrandbits(32))


def pingpong(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """Small messages, each waiting for its echo, with short pauses."""
    sizes = [rng.randrange(1, 4096) for _ in range(rng.randrange(10, 200))]
    seed = rng.getrandbits(32)
    header(sock, sid, "echo", size=sum(sizes), seed=seed)
    payload, at, tally = b"".join(stream(seed, sum(sizes))), 0, Tally(seed)
    for i, n in enumerate(sizes):
        sock.sendall(payload[at:at + n])
        got = b""
        while len(got) < n and (data := sock.recv(n - len(got))):
            got += data
        tally.add(got)
        if got != payload[at:at + n]:
            return f"reply {i} differs: {len(got)} B back for {n} B sent"
        at += n
        if rng.random() < 0.1:
            time.sleep(rng.random() * 0.05)
    sock.shutdown(socket.SHUT_WR)
    read_to_eof(sock, tally)
    return tally.verdict(sum(sizes))


def upload(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """The client sends and half-closes, the service (sometimes slow to read) answers."""
    size, seed = pick_size(rng), rng.getrandbits(32)
    header(sock, sid, "sink", size=size, seed=seed, stall=STALL if rng.random() < 0.3 else 0)
    send_stream(sock, seed, size)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while data := sock.recv(4096):
        reply += data
    return json.loads(reply)["outcome"] if reply else "no answer from the service: a clean EOF"


def download(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """The service sends and half-closes first; then the client sends (the service checks)."""
    size, up, seed = pick_size(rng), pick_size(rng), rng.getrandbits(32)
    header(sock, sid, "source", size=size, up=up, seed=seed)
    tally = Tally(seed)
    if rng.random() < 0.3 and not read_to_eof(sock, tally, upto=min(size, CHUNK)):
        time.sleep(STALL)  # a receiver that stops reading for a while, then resumes
    read_to_eof(sock, tally)
    if (verdict := tally.verdict(size)) == "ok":
        send_stream(sock, seed + 1, up)
        sock.shutdown(socket.SHUT_WR)
    return verdict


def reset_client(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """The client aborts (RST) mid-transfer; the service must see a reset, not an EOF."""
    seed = rng.getrandbits(32)
    header(sock, sid, "echo", size=32 * MiB, seed=seed, expect="reset")
    tally = Tally(seed)
    if duplex(sock, stream(seed, 32 * MiB), tally, stop_at=rng.randrange(1, MiB), ahead=MiB):
        return f"the echo ended after {tally.n} B, before the client's reset"
    abort(sock)
    return "ok" if tally.intact() else f"corrupt: the {tally.n} B echoed differ"


def read_until_reset(sock: socket.socket, tally: Tally, size: int, what: str) -> str:
    """Read on: a reset is what should end this stream; a clean EOF is a truncation."""
    try:
        eof = read_to_eof(sock, tally)
    except ConnectionResetError:
        return "ok" if tally.intact() else f"corrupt: the {tally.n} B before the reset differ"
    if eof and tally.n < size:
        return f"truncated: {what} arrived as a clean EOF after {tally.n} of {size} B"
    return f"{what} never came: all {tally.n} B arrived"


def reset_service(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """The service aborts (RST) mid-transfer; the client must see a reset, not an EOF."""
    seed, rst_at = rng.getrandbits(32), rng.randrange(0, 4 * MiB)
    header(sock, sid, "source", size=8 * MiB, seed=seed, rst_at=rst_at)
    return read_until_reset(sock, Tally(seed), 8 * MiB, "the service's reset")


def idle(sock: socket.socket, rng: random.Random, sid: str, args) -> str:
    """A receiver that stops reading past the idle timeout while the proxies hold bytes for
    it: the idle timeout must end the stream with a reset, never a clean EOF."""
    seed, size = rng.getrandbits(32), 64 * MiB  # more than every buffer on the way holds
    header(sock, sid, "source", size=size, seed=seed, expect="reset")
    tally = Tally(seed)
    read_to_eof(sock, tally, upto=4 * CHUNK)
    time.sleep(2 * args.idle_timeout + 2)
    return read_until_reset(sock, tally, size, "the idle timeout's reset")


KINDS = {bulk: 3, pingpong: 2, upload: 2, download: 2, reset_client: 1, reset_service: 1}


def drive(args) -> int:
    deadline = time.monotonic() + args.seconds
    res: dict = {"sessions": Counter(), "ok_ids": [], "failed": []}
    lock = threading.Lock()

    def one(kind, port: int, sid: str, rng: random.Random) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                verdict = kind(sock, rng, sid, args)
        except Exception as exc:  # any error is this session's failure
            verdict = f"{type(exc).__name__}: {exc}"
        with lock:
            res["sessions"][kind.__name__] += 1
            if verdict == "ok":
                res["ok_ids"].append(sid)
            else:
                res["failed"].append(f"{sid} {kind.__name__} via port {port}: {verdict}")

    def worker(w: int) -> None:
        rng, i = random.Random(f"{args.label}-{w}"), 0
        while time.monotonic() < deadline:
            kind, port = rng.choices(list(KINDS), list(KINDS.values()))[0], rng.choice(args.ports)
            one(kind, port, f"{args.label}-{port}-{w}.{i}", rng)
            i += 1

    if args.once:
        threads = [threading.Thread(target=one, args=(last, p, f"{args.label}-{p}",
                                                      random.Random(p))) for p in args.ports]
    else:
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        if args.idle_timeout and args.seconds >= 2 * args.idle_timeout + 2:
            threads += [threading.Thread(target=one, args=(idle, p, f"{args.label}-idle-{p}",
                                                           random.Random(p)))
                        for p in args.ports]
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:  # each session ends by itself: every socket call has a timeout
        t.join(max(0.0, deadline - time.monotonic()) + 5 * TIMEOUT)
        if t.is_alive():
            res["failed"].append(f"a session was still running {5 * TIMEOUT:g} s after the end")
    res["received"] = Tally.total
    emit(res)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve").add_argument("port", type=int)
    d = sub.add_parser("drive")
    d.add_argument("--ports", type=lambda s: [int(p) for p in s.split(",")], required=True)
    d.add_argument("--seconds", type=float, default=10.0)
    d.add_argument("--label", default="s")
    d.add_argument("--concurrency", type=int, default=6)
    d.add_argument("--idle-timeout", type=float, default=0.0)
    d.add_argument("--once", action="store_true")
    args = parser.parse_args(argv)
    return serve(args.port) if args.cmd == "serve" else drive(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
