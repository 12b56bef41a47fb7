"""A sha256-checking service and its client, run inside the scale-out test's namespaces.

    python shaservice.py [--save DIR] serve PORT NAME
                                                every connection: read to EOF, answer one JSON
                                                line {"backend": NAME, "bytes", "sha256"}, close;
                                                --save: also keep its bytes in DIR/NAME-N.bin
    python shaservice.py [--rate B/s] [--seed S] send HOST PORT SIZE N
                                                N connections one after another, each sending
                                                SIZE seeded bytes, half-closing and checking
                                                the answer; --rate paces the sending

The sender prints one JSON line per connection, {"i", "backend", "bytes", "ok"} (ok: the
service got every byte and the same sha256), and {"i", "progress": n} lines (flushed) every
MiB while it sends, so a test can act mid-transfer. Every socket call has a timeout
(--timeout, default 60 s); the sender exits 1 when any connection was not ok.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator

CHUNK = 64 * 1024
PROGRESS_EVERY = 1 << 20


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def answer(conn: socket.socket, name: str, timeout: float, save: str | None) -> None:
    digest, total = hashlib.sha256(), 0
    out = open(save, "wb") if save else None  # noqa: SIM115 (closed below)
    with conn:
        conn.settimeout(timeout)
        try:
            for data in iter(lambda: conn.recv(CHUNK), b""):
                digest.update(data)
                total += len(data)
                if out is not None:
                    out.write(data)
            reply = {"backend": name, "bytes": total, "sha256": digest.hexdigest()}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the client sees the missing answer
        finally:
            if out is not None:
                out.close()


def serve(port: int, name: str, timeout: float, save: str | None = None) -> int:
    with socket.create_server(("::", port), family=socket.AF_INET6, backlog=128,
                              dualstack_ipv6=True) as lsock:
        for n in itertools.count():  # stopped by the test bed
            conn, _ = lsock.accept()
            path = f"{save}/{name}-{n:05d}.bin" if save else None
            threading.Thread(target=answer, args=(conn, name, timeout, path),
                             daemon=True).start()
    return 0


def stream(seed: int, size: int) -> Iterator[bytes]:
    """The bytes a sender with this seed sends, in the chunks it sends them."""
    rng, sent = random.Random(seed), 0
    while sent < size:
        data = rng.randbytes(min(CHUNK, size - sent))
        sent += len(data)
        yield data


def send_one(host: str, port: int, size: int, seed: int, i: int, rate: float | None,
             timeout: float) -> dict:
    digest, sent = hashlib.sha256(), 0
    start, next_report = time.monotonic(), PROGRESS_EVERY
    with socket.create_connection((host, port), timeout=timeout) as conn:
        for data in stream(seed, size):
            conn.sendall(data)
            digest.update(data)
            sent += len(data)
            if sent >= next_report:
                report(i=i, progress=sent)
                next_report += PROGRESS_EVERY
            if rate:  # no faster than rate bytes a second
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while data := conn.recv(CHUNK):
            reply += data
    try:
        got = json.loads(reply)
    except ValueError:
        return {"i": i, "backend": None, "bytes": 0, "ok": False, "reply": reply.decode("latin-1")}
    ok = got["bytes"] == size and got["sha256"] == digest.hexdigest()
    return {"i": i, "backend": got["backend"], "bytes": got["bytes"], "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=None, help="send: bytes a second")
    parser.add_argument("--seed", type=int, default=0, help="send: the first stream's seed")
    parser.add_argument("--save", metavar="DIR", help="serve: keep each connection's bytes")
    parser.add_argument("cmd", choices=("serve", "send"))
    parser.add_argument("where", nargs="+", help="serve: PORT NAME; send: HOST PORT SIZE N")
    args = parser.parse_args()
    if args.cmd == "serve":
        port, name = args.where
        return serve(int(port), name, args.timeout, args.save)
    host, port, size, count = args.where
    port, size, count = int(port), int(size), int(count)
    bad = 0
    for i in range(count):
        try:
            res = send_one(host, port, size, args.seed + i, i, args.rate, args.timeout)
        except OSError as exc:
            res = {"i": i, "backend": None, "bytes": 0, "ok": False, "error": str(exc)}
        bad += not res["ok"]
        report(**res)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
