"""Control plane: asyncio (uvloop) listens, accepts, resolves, connects upstream with a
timeout, hands the fd pair to the relay, logs each connection's end, handles signals and
drains. It never touches payload bytes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket

from mptcpproxy import check, connlog, logsetup, origdst, sockets
from mptcpproxy.accepting import Accepting
from mptcpproxy.config import Config
from mptcpproxy.connect import OUT_OF_RESOURCES, Attempt, literal, resolve
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.metrics import Metrics, connect_failure_reason, start_metrics_server
from mptcpproxy.relay import ENGINE, Relay
from mptcpproxy.relay._results import ACCEPT_ERROR, FAILED, Result
from mptcpproxy.sdnotify import sd_notify

log = logging.getLogger("mptcpproxy")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


class StartupError(Exception):
    """The proxy cannot start; the message is one sentence for a person."""


class Proxy(Accepting):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.relay: Relay | None = None
        self.listener: socket.socket | None = None
        self.conns: dict[int, Conn] = {}
        self.connecting: set[Attempt] = set()
        self.fast = False  # the relay workers accept and connect themselves
        self.hurry = False  # a second SIGTERM/SIGINT: cut the drain short
        self.stopping: asyncio.Event | None = None
        self._last_warning: dict[str, float] = {}
        self._accept_paused = False  # out of fds: the listener is left alone for a moment
        self._resolving: asyncio.Task | None = None  # -r's name, before a batch is accepted
        self.metrics = Metrics(
            active=lambda: len(self.connecting) + (self.relay.active if self.relay else 0),
            worker_stats=lambda: self.relay.stats() if self.relay else [],
        )
        self.metrics_server: asyncio.AbstractServer | None = None
        self.transparent = None  # origdst.Transparent in transparent mode
        self.firewall = None  # firewall.Method with --setup-firewall

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if not cfg.disable_mptcp:
            why = sockets.mptcp_unavailable()
            if why:
                raise StartupError(why)
        # subflow settings that leave a server's connections one path (before any fd exists)
        for text in check.startup_warnings(cfg):
            log.warning("%s", text)
        if cfg.transparent or cfg.mark:
            self._start_transparent()
        if cfg.remote is not None and not cfg.remote.is_literal:
            try:
                await resolve(asyncio.get_running_loop(), cfg.remote)
            except OSError as exc:
                raise StartupError(
                    f"cannot resolve the remote host '{cfg.remote.host}' ({reason(exc)}): "
                    "check the name or give an IP address"
                ) from None
        try:
            self.listener = sockets.make_listener(
                cfg.bind, cfg.port, cfg.listen_mptcp, cfg.backlog,
                transparent=cfg.transparent == "tproxy",
            )
        except OSError as exc:
            raise StartupError(self._listen_error(exc)) from None
        self.relay = self._start_relay()
        if cfg.metrics is not None:
            try:
                self.metrics_server = await start_metrics_server(
                    self.metrics, cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:
                raise StartupError(self._metrics_error(exc)) from None
        loop = asyncio.get_running_loop()
        loop.add_reader(self.relay.notify_fd, self._on_results)
        # A fixed upstream address needs no decision per connection: the relay workers
        # accept and connect themselves, no Python runs until the connection's end.
        self.fast = (self.transparent is None and cfg.remote.is_literal
                     and not cfg.max_connections)
        if self.fast:
            family, sockaddr = literal(cfg.remote)
            mptcp_side = -1 if cfg.disable_mptcp else 1 if cfg.upstream_mptcp else 0
            self.relay.listen(self.listener.fileno(), family, sockaddr, cfg.upstream_mptcp,
                              mptcp_side, cfg.mark, cfg.connect_timeout)
        else:
            loop.add_reader(self.listener.fileno(), self._on_accept)
        self.stopping = asyncio.Event()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        name = sockets.peer_name(self.listener.getsockname())
        log.info(
            "listening on %s (%s), forwarding to %s over %s; %d relay worker(s), %s engine",
            name, "MPTCP" if cfg.listen_mptcp else "TCP",
            f"the original destination (-t {cfg.transparent}"
            + (f"; not intercepted: {cfg.remote})" if cfg.remote else ")")
            if cfg.transparent else cfg.remote,
            "MPTCP" if cfg.upstream_mptcp else "TCP", cfg.worker_count, ENGINE,
        )

    def _on_stop_signal(self) -> None:
        if self.stopping.is_set():
            self.hurry = True
            log.info("second stop signal: closing the open connections now")
        self.stopping.set()

    def _on_hangup(self) -> None:
        # systemctl reload and logrotate's postrotate: never fatal (DESIGN.md, Operations).
        reopened = logsetup.reopen_log_files()
        if reopened:
            log.info("SIGHUP: reopened the log file %s", ", ".join(reopened))
        else:
            log.info("SIGHUP: no log file to reopen; configuration reload is not supported "
                     "yet; ignored")

    def _start_transparent(self) -> None:
        from mptcpproxy import conntrack, firewall

        cfg = self.config
        if cfg.mark:
            try:
                sockets.stream_socket(socket.AF_INET, False, cfg.mark).close()
            except PermissionError:
                raise StartupError("--mark needs CAP_NET_ADMIN: run as root, or leave out "
                                   "--mark and exclude the proxy's user in the rules") from None
        if not cfg.transparent:
            return
        self.transparent = origdst.Transparent(cfg.transparent, cfg.port, cfg.remote)
        if cfg.transparent == "redirect" and cfg.listen_mptcp:
            why = conntrack.probe()  # the original destination of MPTCP comes from there
            if why:
                raise StartupError(why)
        if cfg.setup_firewall:
            self.firewall = firewall.method_for(cfg)
            why = self.firewall.unsupported_reason()
            if why:
                raise StartupError(why)

    def _start_relay(self) -> Relay:
        cfg = self.config
        try:
            return Relay(cfg.worker_count, cfg.buffer_size, cfg.idle_timeout, cfg.splice,
                         cfg.busy_poll)
        except (MemoryError, OSError, RuntimeError) as exc:  # RuntimeError: no new thread
            why = "out of memory" if isinstance(exc, MemoryError) else reason(exc)
            raise StartupError(
                f"cannot start {cfg.worker_count} relay workers with {cfg.buffer_size >> 10} "
                f"KiB buffers ({why}): use fewer --workers or a smaller --buffer-size"
            ) from None

    def _listen_error(self, exc: OSError) -> str:
        cfg = self.config
        where = f"port {cfg.port}" + (f" on {cfg.bind}" if cfg.bind else "")
        if exc.errno == errno.EPERM and cfg.transparent == "tproxy":
            return ("-t tproxy needs CAP_NET_ADMIN for its transparent listener: run as "
                    "root, or use -t redirect")
        if exc.errno == errno.EADDRINUSE:
            return f"{where} is already in use: stop the other program or choose another -p"
        if exc.errno == errno.EACCES:
            return f"no permission to listen on {where}: run as root or use a port above 1023"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot listen on {cfg.bind}: no interface has that address"
        if exc.errno in (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL):
            return sockets.mptcp_refusal(exc.errno)
        return f"cannot listen on {where}: {os.strerror(exc.errno or 0)}"

    def _metrics_error(self, exc: OSError) -> str:
        where = self.config.metrics
        if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code, not for strerror
            return (f"cannot serve metrics on {where}: cannot resolve the name '{where.host}' "
                    f"({exc.strerror}): check the name or give an IP address")
        return f"cannot serve metrics on {where}: {os.strerror(exc.errno or 0).lower()}"

    # -- results --------------------------------------------------------------------------

    def _on_results(self) -> None:
        # Every collect goes through here, the drain's last one too: a connect failure is
        # never reported as a closed connection, an accept error never dropped.
        for result in self.relay.collect():
            if result.reason == FAILED:
                self._log_failed(result)
            elif result.reason == ACCEPT_ERROR:
                self.metrics.accept_error()
                self._warn_once("accept-fds", "cannot accept: %s; pausing accepts for 100 ms",
                                os.strerror(result.errno))
            else:
                self._log_result(result)

    def _log_failed(self, r: Result) -> None:
        # A connection the relay accepted itself whose upstream could not be reached.
        exc = TimeoutError("timed out") if r.errno == errno.ETIMEDOUT else OSError(
            r.errno, os.strerror(r.errno))
        self.metrics.connect_failed(connect_failure_reason(exc))
        if r.errno in OUT_OF_RESOURCES:  # a burst of these: one line a second is enough
            self._warn_once("accept-fds", "cannot accept: %s; closing new connections and "
                            "pausing accepts for 100 ms", os.strerror(r.errno))
            return
        log.warning(
            "conn %d from %s: upstream %s failed: %s; closing the client connection",
            r.conn_id, sockets.peer_name(r.client), self.config.remote, reason(exc),
        )

    def _log_result(self, r: Result) -> None:
        conn = self.conns.pop(r.conn_id, None)
        if conn is None:
            if r.client is None:
                return
            cfg = self.config  # accepted by the relay itself: -r is the upstream
            conn = Conn(r.client, literal(cfg.remote)[1], not cfg.disable_mptcp)
        self.metrics.connection_closed(r, conn.mptcp_leg)
        connlog.log_end(r, conn)

    # -- stop -----------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self.start()
            await self._until_stopped()
            await self.drain()
        finally:
            _ignore_signals(asyncio.get_running_loop())

    async def _until_stopped(self) -> None:
        try:
            if self.firewall is not None:
                try:
                    self.firewall.setup_firewall()
                except Exception as exc:  # firewall.FirewallError
                    raise StartupError(str(exc)) from None
            sd_notify("READY=1")  # listening, and the firewall rules (if any) are in place
            await self.stopping.wait()
        finally:
            if self.firewall is not None:
                # before the drain: new connections then flow as if the proxy were not there
                self.firewall.restore_firewall()

    async def drain(self) -> None:
        """Stop accepting at once; let open pairs finish for drain_timeout, then abort them."""
        loop = asyncio.get_running_loop()
        sd_notify("STOPPING=1")
        self.stopping.set()
        await self._stop_accepting(loop)
        for attempt in list(self.connecting):
            attempt.cancel()
        self.connecting.clear()
        deadline = loop.time() + self.config.drain_timeout
        if self.relay.active:
            log.info("draining %d open connection(s), for %.0f s at most",
                     self.relay.active, self.config.drain_timeout)
        while self.relay.active and loop.time() < deadline and not self.hurry:
            await asyncio.sleep(0.05)
        loop.remove_reader(self.relay.notify_fd)
        self.relay.close()  # which also takes the listener out of every worker's epoll set
        self._on_results()
        self._close_listener()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("stopped")

    async def _stop_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        # The listener is the control plane's: it is closed only once no worker polls it
        # (DESIGN.md, ownership), else its fd number could be reused under a worker's epoll.
        if self.listener is None:
            return
        if not self.fast:
            loop.remove_reader(self.listener.fileno())
            if self._resolving is not None:
                self._resolving.cancel()
            self._close_listener()
            return
        self.relay.unlisten()
        deadline = loop.time() + 2.0
        while self.relay.listening and loop.time() < deadline:
            await asyncio.sleep(0.002)
        if self.relay.listening:
            log.warning("a relay worker still polls the listener: it is closed once the "
                        "relay has stopped")
            return
        self._close_listener()

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _ignore_signals(loop: asyncio.AbstractEventLoop) -> None:
    # Stopped (or failed to start): a late SIGTERM (systemd signals the whole cgroup, a
    # supervisor may repeat itself) or SIGHUP must not turn the exit code into death by
    # signal, neither here nor when the loop closes. Blocked while the loop's handlers go
    # (which restores SIG_DFL), then ignored, which also drops a pending one.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
        # The relay first: closing it takes the listener out of every worker's epoll set.
        if proxy.relay is not None:
            proxy.relay.close()
        proxy._close_listener()
    return 0
