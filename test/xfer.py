"""Bulk transfer with a sha256 on both ends, run inside the test namespaces.

    python xfer.py recv PORT          accept one connection (dual-stack), read it to EOF
    python xfer.py send HOST PORT N   send N pseudo-random bytes, half-close, wait for EOF

Both print a last JSON line ``{"bytes": n, "sha256": "..."}``; the receiver prints
``{"progress": n}`` lines (flushed) while it reads, so a test can act mid-transfer.
Every socket call has a timeout (``--timeout``, default 60 s): a stall ends with exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys

CHUNK = 64 * 1024
PROGRESS_EVERY = 1 << 20


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def recv(port: int, timeout: float) -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as lsock:
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("::", port))
        lsock.listen(1)
        lsock.settimeout(timeout)
        conn, _ = lsock.accept()
    digest, total, next_report = hashlib.sha256(), 0, PROGRESS_EVERY
    with conn:
        conn.settimeout(timeout)
        try:
            while data := conn.recv(CHUNK):
                digest.update(data)
                total += len(data)
                if total >= next_report:
                    report(progress=total)
                    next_report += PROGRESS_EVERY
        except TimeoutError:
            report(bytes=total, sha256=digest.hexdigest(), error="stalled")
            return 1
    report(bytes=total, sha256=digest.hexdigest())
    return 0


def send(host: str, port: int, size: int, timeout: float) -> int:
    rng, digest, left = random.Random(size), hashlib.sha256(), size
    with socket.create_connection((host, port), timeout=timeout) as conn:
        while left:
            data = rng.randbytes(min(CHUNK, left))
            conn.sendall(data)
            digest.update(data)
            left -= len(data)
        conn.shutdown(socket.SHUT_WR)
        # the peer closes after it read everything: the transfer is complete end to end
        while conn.recv(CHUNK):
            pass
    report(bytes=size, sha256=digest.hexdigest())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("port", type=int)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("size", type=int)
    args = parser.parse_args()
    if args.cmd == "recv":
        return recv(args.port, args.timeout)
    return send(args.host, args.port, args.size, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
