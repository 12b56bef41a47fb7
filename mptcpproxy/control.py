"""Control plane: asyncio (uvloop) listens, accepts, resolves, connects upstream with a
timeout, hands the fd pair to the relay, logs each connection's end, handles signals and
drains. It never touches payload bytes."""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from mptcpproxy import sockets
from mptcpproxy.config import Config, HostPort
from mptcpproxy.relay import ENGINE, Relay, Result

log = logging.getLogger("mptcpproxy")

ACCEPT_BATCH = 64  # accepts per wake-up, so set-up tasks get the loop in between


class StartupError(Exception):
    """The proxy cannot start; the message is one sentence for a person."""


@dataclass
class _Conn:
    client: str
    upstream: str
    mptcp_leg: bool


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.relay: Relay | None = None
        self.listener: socket.socket | None = None
        self.conns: dict[int, _Conn] = {}
        self.connecting: set[asyncio.Task] = set()
        self.ids = itertools.count(1)
        self.stopping: asyncio.Event | None = None
        self._last_warning: dict[str, float] = {}
        self.rejected = 0

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if not cfg.disable_mptcp:
            why = sockets.mptcp_unavailable()
            if why:
                raise StartupError(why)
        if cfg.remote is not None and not cfg.remote.is_literal:
            try:
                await self._resolve(cfg.remote)
            except OSError as exc:
                raise StartupError(
                    f"cannot resolve the remote host '{cfg.remote.host}' ({_reason(exc)}): "
                    "check the name or give an IP address"
                ) from None
        try:
            self.listener = sockets.make_listener(
                cfg.bind, cfg.port, cfg.listen_mptcp, cfg.backlog
            )
        except OSError as exc:
            raise StartupError(self._listen_error(exc)) from None
        self.relay = Relay(cfg.worker_count, idle_timeout=cfg.idle_timeout)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.relay.notify_fd, self._on_results)
        loop.add_reader(self.listener.fileno(), self._on_accept)
        self.stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        name = sockets.peer_name(self.listener.getsockname())
        log.info(
            "listening on %s (%s), forwarding to %s over %s; %d relay worker(s), %s engine",
            name, "MPTCP" if cfg.listen_mptcp else "TCP", cfg.remote,
            "MPTCP" if cfg.upstream_mptcp else "TCP", cfg.worker_count, ENGINE,
        )

    def _listen_error(self, exc: OSError) -> str:
        cfg = self.config
        where = f"port {cfg.port}" + (f" on {cfg.bind}" if cfg.bind else "")
        if exc.errno == errno.EADDRINUSE:
            return f"{where} is already in use: stop the other program or choose another -p"
        if exc.errno == errno.EACCES:
            return f"no permission to listen on {where}: run as root or use a port above 1023"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot listen on {cfg.bind}: no interface has that address"
        if exc.errno in (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL):
            return sockets.mptcp_refusal(exc.errno)
        return f"cannot listen on {where}: {os.strerror(exc.errno or 0)}"

    # -- accept ---------------------------------------------------------------------------

    def _on_accept(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accept(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    self._warn_once("accept", "accept failed: %s", os.strerror(exc.errno or 0))
                return
            limit = self.config.max_connections
            if limit and self.relay.active + len(self.connecting) >= limit:
                self.rejected += 1
                self._warn_once(
                    "limit", "%d connections open (--max-connections): closing new ones", limit
                )
                conn.close()
                continue
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._setup(conn, addr))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    def _pause_accept(self, exc: OSError) -> None:
        # Out of fds: stop polling the listener for a moment instead of spinning on it.
        self._warn_once(
            "accept-fds", "cannot accept: %s; pausing accepts for 100 ms",
            os.strerror(exc.errno or 0),
        )
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.listener.fileno())
        loop.call_later(0.1, self._resume_accept)

    def _resume_accept(self) -> None:
        if self.listener is not None and not self.stopping.is_set():
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._on_accept)

    def _warn_once(self, key: str, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, 0.0) >= 1.0:
            self._last_warning[key] = now
            log.warning(msg, *args)

    # -- connection set-up ----------------------------------------------------------------

    async def _resolve(self, remote: HostPort) -> list[tuple[int, tuple]]:
        if remote.is_literal:
            family = socket.AF_INET6 if ":" in remote.host else socket.AF_INET
            return [(family, (remote.host, remote.port))]
        infos = await asyncio.get_running_loop().getaddrinfo(
            remote.host, remote.port, type=socket.SOCK_STREAM
        )
        return [(family, sockaddr) for family, _, _, _, sockaddr in infos]

    async def _connect(self, target: HostPort) -> tuple[socket.socket, tuple]:
        """Connect upstream, trying every address of the target within the timeout."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.connect_timeout
        addresses = await asyncio.wait_for(self._resolve(target), cfg.connect_timeout)
        last: BaseException = OSError(errno.EHOSTUNREACH, "no address")
        for family, sockaddr in addresses:
            sock = sockets.stream_socket(family, cfg.upstream_mptcp)
            try:
                await asyncio.wait_for(
                    loop.sock_connect(sock, sockaddr), max(deadline - loop.time(), 0.001)
                )
                return sock, sockaddr
            except (OSError, asyncio.TimeoutError) as exc:
                sock.close()
                last = exc
                if loop.time() >= deadline:
                    break
            except BaseException:  # cancelled by a drain
                sock.close()
                raise
        raise last

    async def _setup(self, client: socket.socket, addr: tuple) -> None:
        conn_id = next(self.ids)
        peer = sockets.peer_name(addr)
        target = self.config.remote
        try:
            upstream, sockaddr = await self._connect(target)
        except asyncio.CancelledError:
            client.close()
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning(
                "conn %d from %s: upstream %s failed: %s; closing the client connection",
                conn_id, peer, target, _reason(exc),
            )
            client.close()
            return
        sockets.set_nodelay(client)
        sockets.set_nodelay(upstream)
        cfg = self.config
        up_name = sockets.peer_name(sockaddr)
        log.debug("conn %d: %s -> %s established", conn_id, peer, up_name)
        mptcp_leg = not cfg.disable_mptcp
        self.conns[conn_id] = _Conn(peer, up_name, mptcp_leg)
        fd_client, fd_up = client.detach(), upstream.detach()
        mptcp_fd = -1 if not mptcp_leg else fd_up if cfg.upstream_mptcp else fd_client
        self.relay.add(fd_client, fd_up, conn_id, mptcp_fd)

    # -- results --------------------------------------------------------------------------

    def _on_results(self) -> None:
        for result in self.relay.collect():
            self._log_result(result)

    def _log_result(self, r: Result) -> None:
        conn = self.conns.pop(r.conn_id, None)
        if conn is None:
            return
        how = r.reason
        if r.errno:
            how += f" ({os.strerror(r.errno).lower()})"
        if not conn.mptcp_leg:
            mptcp = "mptcp=off"
        elif r.is_mptcp:
            mptcp = f"mptcp=yes subflows={r.subflows}"
        else:
            mptcp = "mptcp=no (fell back to TCP)"
        log.info(
            "conn %d %s: client %s upstream %s sent %d B received %d B in %.3f s, %s",
            r.conn_id, how, conn.client, conn.upstream, r.bytes_ab, r.bytes_ba,
            r.duration, mptcp,
        )

    # -- stop -----------------------------------------------------------------------------

    async def serve(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.drain()

    async def drain(self) -> None:
        """Stop accepting at once; let open pairs finish for drain_timeout, then abort them."""
        loop = asyncio.get_running_loop()
        if self.listener is not None:
            loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        for task in list(self.connecting):
            task.cancel()
        if self.connecting:
            await asyncio.gather(*self.connecting, return_exceptions=True)
        deadline = loop.time() + self.config.drain_timeout
        if self.relay.active:
            log.info("draining %d open connection(s), for %.0f s at most",
                     self.relay.active, self.config.drain_timeout)
        while self.relay.active and loop.time() < deadline:
            await asyncio.sleep(0.05)
        loop.remove_reader(self.relay.notify_fd)
        self.relay.close()
        for result in self.relay.collect():
            self._log_result(result)
        log.info("stopped")


def _run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:  # the wheel depends on it; a source checkout may lack it
        log.warning("uvloop is not installed; using the standard asyncio loop")
        asyncio.run(coro)
        return
    if hasattr(uvloop, "run"):
        uvloop.run(coro)
    else:  # uvloop < 0.18
        uvloop.install()
        asyncio.run(coro)


def run(config: Config) -> int:
    """Serve until SIGINT/SIGTERM, then drain; raises StartupError when it cannot start."""
    proxy = Proxy(config)
    try:
        _run_loop(proxy.serve())
    finally:
        if proxy.listener is not None:
            proxy.listener.close()
        if proxy.relay is not None:
            proxy.relay.close()
    return 0
