"""Streams for the soak (soak.py): pseudo-random bytes from a seed both ends know, checked
by sha256 where they arrive, and the socket moves both ends make. Every socket call has a
timeout."""

from __future__ import annotations

import hashlib
import json
import random
import selectors
import socket
import struct
import threading

TIMEOUT = 60.0
CHUNK = 64 * 1024
MiB = 1 << 20
_print_lock = threading.Lock()


def emit(obj: dict) -> None:
    with _print_lock:
        print(json.dumps(obj), flush=True)


def stream(seed: int, size: int):
    """The bytes of stream `seed`, in chunks; any length is a prefix of a longer one."""
    rng = random.Random(seed)
    while size > 0:
        block = rng.randbytes(CHUNK)[:size]  # whole chunks only: the prefix property
        size -= len(block)
        yield block


class Tally:
    """What arrived: its length and sha256, checked against the stream it should be."""

    total = 0  # bytes received by every tally of this process
    _lock = threading.Lock()

    def __init__(self, seed: int) -> None:
        self.seed, self.n, self.sha = seed, 0, hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.n += len(data)
        self.sha.update(data)
        with self._lock:
            Tally.total += len(data)

    def intact(self) -> bool:
        """Whether every byte so far is the start of the stream."""
        want = hashlib.sha256()
        for block in stream(self.seed, self.n):
            want.update(block)
        return want.digest() == self.sha.digest()

    def verdict(self, size: int) -> str:
        if not self.intact():
            return f"corrupt: {self.n} B whose sha256 differs from the {self.n} B sent"
        if self.n != size:
            return f"truncated: a clean EOF after {self.n} of {size} B"
        return "ok"


def read_to_eof(sock: socket.socket, tally: Tally, upto: int | None = None) -> bool:
    """Read into `tally` until EOF (True) or until `upto` bytes arrived (False)."""
    while upto is None or tally.n < upto:
        data = sock.recv(CHUNK)
        if not data:
            return True
        tally.add(data)
    return False


def send_stream(sock: socket.socket, seed: int, size: int) -> None:
    for block in stream(seed, size):
        sock.sendall(block)


def abort(sock: socket.socket) -> None:
    """Close with a reset (RST), not a FIN: SO_LINGER on with a zero timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def duplex(sock: socket.socket, payload, tally: Tally, stop_at: int | None = None,
           ahead: int | None = None) -> bool:
    """Send every block of `payload`, then SHUT_WR, while reading into `tally`.

    Returns True at EOF, False once `stop_at` bytes came back. With `ahead`, at most that
    many bytes are sent beyond those that came back.
    """
    sock.setblocking(False)
    try:
        return _duplex(sock, payload, tally, stop_at, ahead)
    finally:
        sock.settimeout(TIMEOUT)


def _duplex(sock: socket.socket, payload, tally: Tally, stop_at: int | None,
            ahead: int | None) -> bool:
    out, sent, done = memoryview(b""), 0, False
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while stop_at is None or tally.n < stop_at:
            writing = not done and (ahead is None or sent - tally.n < ahead)
            sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
            if not sel.select(TIMEOUT):
                raise TimeoutError(f"no byte moved for {TIMEOUT:g} s")
            try:
                data = sock.recv(CHUNK)
                if not data:
                    return True
                tally.add(data)
            except BlockingIOError:
                pass
            if writing:
                if not out:
                    block = next(payload, None)
                    if block is None:
                        sock.shutdown(socket.SHUT_WR)
                        done = True
                        continue
                    out = memoryview(block)
                try:
                    n = sock.send(out)
                except BlockingIOError:
                    n = 0
                out, sent = out[n:], sent + n
    return False
