"""Peers for the loopback proxy tests, run as processes inside a test namespace.

    python peers.py echo PORT                 echo every connection back, half-close after EOF
    python peers.py reply PORT SIZE           read a request to EOF, then send SIZE bytes
                                              (seeded by the request's sha256) and close
    python peers.py clients HOST PORT N SEED  N concurrent connections through the proxy, each
                                              sending a random size and checking the echo
    python peers.py ask HOST PORT SIZE        send a request, half-close, check the whole reply

Servers listen dual-stack on `::`. Clients print one JSON line with their findings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import sys

TIMEOUT = 60
CHUNK = 256 * 1024


def reply_bytes(request: bytes, size: int) -> bytes:
    seed = int.from_bytes(hashlib.sha256(request).digest()[:8], "big")
    return random.Random(seed).randbytes(size)


async def serve(handler, port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    server = await asyncio.start_server(handler, sock=sock, backlog=1024, limit=CHUNK)
    async with server:
        await server.serve_forever()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def make_reply(size: int):
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.read()  # to EOF: the client half-closed first
            writer.write(reply_bytes(request, size))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return reply


async def one_client(host: str, port: int, size: int, seed: int) -> str | None:
    """Send `size` random bytes, half-close, read the echo; None when it came back intact."""
    payload = random.Random(seed).randbytes(size)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=CHUNK), TIMEOUT
    )
    try:

        async def send() -> None:
            for i in range(0, size, CHUNK):
                writer.write(payload[i:i + CHUNK])
                await writer.drain()
            writer.write_eof()

        async def receive() -> bytes:
            return await reader.read()

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), receive()), TIMEOUT)
    finally:
        writer.close()
    if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
        return f"seed {seed}: sent {size} B, got back {len(echoed)} B that differ"
    return None


async def clients(host: str, port: int, n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    sizes = [rnd.choice([0, 1, rnd.randrange(1, 65536), rnd.randrange(1, 4 << 20)])
             for _ in range(n)]
    outcomes = await asyncio.gather(
        *(one_client(host, port, size, seed * 1000 + i) for i, size in enumerate(sizes)),
        return_exceptions=True,
    )
    failed = [repr(o) if isinstance(o, BaseException) else o for o in outcomes if o is not None]
    return {"connections": n, "bytes": sum(sizes), "failed": failed}


def ask(host: str, port: int, size: int) -> dict:
    request = random.Random(size).randbytes(1000)
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while data := sock.recv(CHUNK):
            got += data
    return {"bytes": len(got), "intact": bytes(got) == reply_bytes(request, size)}


def main(argv: list[str]) -> int:
    mode, *rest = argv
    if mode == "echo":
        asyncio.run(serve(echo, int(rest[0])))
    elif mode == "reply":
        asyncio.run(serve(make_reply(int(rest[1])), int(rest[0])))
    elif mode == "clients":
        host, port, n, seed = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
        print(json.dumps(asyncio.run(clients(host, port, n, seed))))
    elif mode == "ask":
        print(json.dumps(ask(rest[0], int(rest[1]), int(rest[2]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
