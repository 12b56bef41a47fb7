"""The `--metrics HOST:PORT` endpoint: `GET /metrics` served from the proxy's own event loop
(no thread), in the format prometheus-client writes (CONTENT_TYPE_LATEST), and the health
checks a load balancer or an orchestrator asks: `GET /ready` (200 while the proxy serves,
503 once it is stopping, so the backend is taken out before its listener goes) and
`GET /live` (200 while the process runs). With a live view (`connections`) it also answers
`GET /connections`, the open connections as JSON (live.py), and `GET /`, the status page that
shows them (statuspage.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST

from mptcpproxy import statuspage

if TYPE_CHECKING:
    from mptcpproxy.metrics import Metrics

REQUEST_TIMEOUT = 5.0  # seconds a scraper may take to send its request
MAX_REQUEST = 8192  # bytes of request line and headers
# live data: never from a cache; a browser must not guess another type than the one given
NOT_STORED = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


async def start_metrics_server(metrics: Metrics, host: str, port: int,
                               ready: Callable[[], bool] | None = None,
                               connections: Callable[[], Any] | None = None) -> asyncio.Server:
    """Serve `GET /metrics`, `/ready` and `/live` on host:port in the running loop; close()
    the server to stop. `/ready` answers 200 while `ready()` is true, else 503 (None:
    always 200). With `connections` (the live.py document, JSON-able), also
    `/connections` and the status page at `/`.

    Raises OSError when the address cannot be bound (port in use, address not local).
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _serve(metrics, ready, connections, reader, writer)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a scraper that went away or sent garbage: nothing to tell
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port, limit=MAX_REQUEST, reuse_address=True)


def _answer(metrics: Metrics, ready: Callable[[], bool] | None,
            connections: Callable[[], Any] | None,
            path: str) -> tuple[str, bytes, dict[str, str]]:
    if path == "/metrics":
        return "200 OK", metrics.render(), {"Content-Type": CONTENT_TYPE_LATEST}
    if path == "/ready":
        if ready is None or ready():
            return "200 OK", b"ready\n", {}
        return "503 Service Unavailable", b"stopping\n", {}
    if path == "/live":
        return "200 OK", b"live\n", {}
    if connections is not None and path == "/connections":
        body = json.dumps(connections(), separators=(",", ":")).encode() + b"\n"
        return "200 OK", body, {"Content-Type": "application/json", **NOT_STORED}
    if connections is not None and path == "/":
        return "200 OK", statuspage.PAGE, {"Content-Type": "text/html; charset=utf-8",
                                           "Content-Security-Policy": statuspage.POLICY,
                                           **NOT_STORED}
    return "404 Not Found", (b"the metrics are at /metrics, health checks at /ready and /live"
                             + (b", the open connections at /connections and the status page "
                                b"at /" if connections is not None else b"") + b"\n"), {}


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line, once the whole head has arrived: lines end with CRLF or a bare LF
    (RFC 9112 2.2 lets a server accept LF, as nginx and HAProxy do: `printf 'GET /ready
    HTTP/1.0\n\n' | nc` is a common health check). Raises LimitOverrunError past
    MAX_REQUEST bytes."""
    first, size = None, 0
    while True:
        line = await reader.readuntil(b"\n")  # a line over the reader's limit raises too
        size += len(line)
        if size > MAX_REQUEST:
            raise asyncio.LimitOverrunError("request head too long", size)
        line = line.rstrip(b"\r\n")
        if first is None:
            first = line
        elif not line:
            return first


async def _serve(metrics: Metrics, ready: Callable[[], bool] | None,
                 connections: Callable[[], Any] | None,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
    words = request_line.decode("latin-1").split()
    headers = {}
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        status, body = "400 Bad Request", b"bad request\n"
    elif words[0] not in ("GET", "HEAD"):
        status, body = "405 Method Not Allowed", b"use GET\n"
        headers["Allow"] = "GET, HEAD"
    else:
        status, body, headers = _answer(metrics, ready, connections, words[1].split("?", 1)[0])
    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    headers.update({"Content-Length": str(len(body)), "Connection": "close"})
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    writer.write("\r\n".join(lines).encode("latin-1") + (body if words[:1] != ["HEAD"] else b""))
    await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
