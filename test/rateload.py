"""A steady connection load: `python rateload.py HOST PORT RATE SECONDS`.

Opens RATE connections a second for SECONDS; each sends 32 random bytes, half-closes and
expects them echoed back. Prints one JSON line: {"ok": N, "failed": {"what": count}}.
Every wait is bounded (30 s per connection)."""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import threading
import time


def one(host: str, port: int, results: collections.Counter, lock: threading.Lock) -> None:
    payload = os.urandom(32)
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while data := s.recv(4096):
                got += data
        what = "ok" if got == payload else f"short reply ({len(got)} B)"
    except OSError as exc:
        what = type(exc).__name__
    with lock:
        results[what] += 1


def main() -> int:
    host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(
        sys.argv[4])
    results: collections.Counter = collections.Counter()
    lock = threading.Lock()
    threads = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=one, args=(host, port, results, lock), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(35)
    ok = results.pop("ok", 0)
    print(json.dumps({"ok": ok, "failed": dict(results), "unfinished":
                      sum(t.is_alive() for t in threads)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
