"""The io_uring prototype engine (mptcpproxy.relay._uring) as a proxy process for the bench:
listen on PORT, relay every connection to HOST:PORT, until SIGTERM or SIGINT.

    python bench/uring_proxy.py LISTEN_PORT UPSTREAM_HOST:PORT [--mptcp-listen]
        [--mptcp-upstream] [--workers N] [--small COUNTxBYTES] [--big COUNTxBYTES]
        [--multishot-accept]

The buffer pools and the accept default to URING_SMALL / URING_BIG / URING_MULTISHOT_ACCEPT
from the environment when set (a lever run changes them without another peer).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from mptcpproxy.relay._uring import Uring, probe

IPPROTO_MPTCP = 262


def pool(text: str) -> tuple[int, int]:
    count, _, size = text.partition("x")
    return int(count), int(size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("upstream")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--mptcp-listen", action="store_true")
    p.add_argument("--mptcp-upstream", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--small", type=pool, default=os.environ.get("URING_SMALL", "256x16384"))
    p.add_argument("--big", type=pool, default=os.environ.get("URING_BIG", "8x524288"))
    # one multishot accept per worker: the first worker's stays first in the listener's
    # queue and takes every connection; single-shot ones (the default) take turns
    p.add_argument("--multishot-accept", action="store_true",
                   default=os.environ.get("URING_MULTISHOT_ACCEPT") == "1")
    args = p.parse_args(argv)
    if why := probe():
        print(f"uring_proxy: {why}", file=sys.stderr)
        return 1
    host, _, port = args.upstream.rpartition(":")
    proto = IPPROTO_MPTCP if args.mptcp_listen else socket.IPPROTO_TCP
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accept
    listener.bind((args.bind, args.port))
    listener.listen(4096)
    relay = Uring(listener, (host.strip("[]"), int(port)), mptcp=args.mptcp_upstream,
                  workers=args.workers, small=args.small, big=args.big,
                  multishot_accept=args.multishot_accept)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    relay.start()
    while not done.wait(1.0):
        relay.collect()
        relay.results.clear()  # a long run would hold every record: only the counters stay
    relay.stop()
    listener.close()
    accepted, finished, enters, _, starved = relay.counters
    print(f"uring_proxy: accepted={accepted} finished={finished} enters={enters} "
          f"starved={starved}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
