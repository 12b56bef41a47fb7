"""Control plane: asyncio (uvloop) runs the listeners (listener.py), hands their pairs to
the one relay, logs each connection's end, handles signals (SIGHUP: reload), and drains.
It never touches payload bytes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Sequence

from mptcpproxy import check, live, logsetup, sdlisten, sockets
from mptcpproxy.config import Config
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.joinwatch import JoinWatch, tick_interval
from mptcpproxy.listener import Listener, ListenerError
from mptcpproxy.metrics import Metrics, start_metrics_server
from mptcpproxy.relay import ENGINE, Relay
from mptcpproxy.results import Results
from mptcpproxy.sdnotify import sd_notify

log = logging.getLogger("mptcpproxy")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
MAX_TAGS = 1024  # the relay's listener tags


class StartupError(Exception):
    """The proxy cannot start; the message is one sentence for a person."""


class Proxy(Results):
    """One process: the relay, the metrics server and every listener."""

    def __init__(self, configs: Sequence[Config] | Config, config_path: str | None = None,
                 ) -> None:
        self.configs = (configs,) if isinstance(configs, Config) else tuple(configs)
        self.config_path = config_path  # --config: what SIGHUP reloads
        self.relay: Relay | None = None
        self.listeners: dict[int, Listener] = {}  # port -> the listener serving it
        self.retired: list[Listener] = []  # stopped (a reload): closing after their pairs
        self.by_tag: dict[int, Listener] = {}
        self.conns: dict[int, Conn] = {}  # conn id -> set-up details, for its end line
        self.hurry = False  # a second SIGTERM/SIGINT: cut the drain short
        self.stopping: asyncio.Event | None = None
        self.passed: list[sdlisten.Passed] = []  # sockets systemd passed
        self._last_warning: dict[str, float] = {}
        self._reloading: asyncio.Task | None = None
        self._retired_timer: asyncio.TimerHandle | None = None
        self._collects = 0  # collect() calls so far (see _close_retired)
        self.joinwatch: JoinWatch | None = None  # with an MPTCP leg: refused joins
        self._joinwatch_timer: asyncio.TimerHandle | None = None
        self.cli_level: int | None = None  # -v/-q on the command line: a reload keeps it
        self.metrics = Metrics(
            active=self._active_by_listener,
            worker_stats=lambda: self.relay.stats() if self.relay else [],
            relay_accepted=self._accepted_by_listener,
            path_totals=lambda: self.relay.path_totals() if self.relay else ({}, 0),
        )
        self.metrics_server: asyncio.AbstractServer | None = None

    def _active_by_listener(self) -> dict[str, int]:
        # read at scrape time: connections being set up, or relayed, per listener label
        out: dict[str, int] = {}
        for lst in self.all_listeners:
            out[lst.label] = out.get(lst.label, 0) + lst.open_count
        return out

    def _accepted_by_listener(self) -> dict[str, int]:
        # the clients the relay workers accepted themselves (the fast path), per label
        out: dict[str, int] = {}
        if self.relay is not None:
            for tag, lst in self.by_tag.items():
                out[lst.label] = out.get(lst.label, 0) + self.relay.accepted(tag)
        return out

    @property
    def config(self) -> Config:
        """The process-wide settings (the same in every listener's Config)."""
        return self.configs[0]

    @property
    def all_listeners(self) -> list[Listener]:
        return [*self.listeners.values(), *self.retired]

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if any(not c.disable_mptcp for c in self.configs):
            why = sockets.mptcp_unavailable()
            if why:
                raise StartupError(why)
        for c in self.configs:
            # subflow settings that leave a server's connections one path (before any fd)
            for text in check.startup_warnings(c):
                log.warning("%s", text)
        try:
            self.passed = sdlisten.take_passed()
        except ValueError as exc:  # config.ConfigError
            raise StartupError(str(exc)) from None
        self.relay = self._start_relay()
        try:
            started = await self._prepare(self.configs)
        except ListenerError as exc:
            raise StartupError(str(exc)) from None
        for p in self.passed:
            if not p.used:
                log.warning("systemd passed the socket %s (%s), which no listener uses",
                            p.name, p.address)
        if cfg.metrics is not None:
            try:
                self.metrics_server = await start_metrics_server(
                    self.metrics, cfg.metrics.host, cfg.metrics.port, ready=lambda: self.ready,
                    connections=lambda: live.document(self))
            except OSError as exc:
                raise StartupError(self._metrics_error(exc)) from None
        loop = asyncio.get_running_loop()
        loop.add_reader(self.relay.notify_fd, self._on_results)
        for lst in started:
            self.listeners[lst.config.port] = lst
            lst.start()
        self.stopping = asyncio.Event()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        if any(c.listen_mptcp or c.upstream_mptcp for c in self.configs):
            self.joinwatch = JoinWatch()
            self._watch_joins()
        log.info("%d listener(s), %d relay worker(s), %s engine", len(self.listeners),
                 cfg.worker_count, ENGINE)

    async def _prepare(self, configs: Sequence[Config]) -> list[Listener]:
        """New listeners for `configs`, their sockets open, not serving yet; on a failure
        the ones already prepared are closed and ListenerError says why."""
        prepared: list[Listener] = []
        try:
            for c in configs:
                lst = Listener(c, self._free_tag(prepared), self.relay,
                               self.metrics.listener(c.label), self.conns)
                prepared.append(lst)
                try:
                    await lst.prepare(self.passed)
                except ListenerError as exc:
                    raise ListenerError(f"listener {c.title}: {exc}"
                                        if len(self.configs) > 1 else str(exc)) from None
        except BaseException:
            for lst in prepared:
                lst.close()
            raise
        for lst in prepared:
            self.by_tag[lst.tag] = lst
        return prepared

    def _free_tag(self, taking: list[Listener]) -> int:
        used = set(self.by_tag) | {lst.tag for lst in taking}
        for tag in range(MAX_TAGS):
            if tag not in used:
                return tag
        raise ListenerError(f"more than {MAX_TAGS} listeners")

    def _start_relay(self) -> Relay:
        cfg = self.config
        try:
            return Relay(cfg.worker_count, cfg.buffer_size, cfg.idle_timeout, cfg.splice,
                         cfg.busy_poll, cfg.path_stats)
        except (MemoryError, OSError, RuntimeError) as exc:  # RuntimeError: no new thread
            why = "out of memory" if isinstance(exc, MemoryError) else reason(exc)
            raise StartupError(
                f"cannot start {cfg.worker_count} relay workers with {cfg.buffer_size >> 10} "
                f"KiB buffers ({why}): use fewer --workers or a smaller --buffer-size"
            ) from None

    def _metrics_error(self, exc: OSError) -> str:
        where = self.config.metrics
        if isinstance(exc, socket.gaierror):  # its errno is an EAI_* code, not for strerror
            return (f"cannot serve metrics on {where}: cannot resolve the name '{where.host}' "
                    f"({exc.strerror}): check the name or give an IP address")
        return f"cannot serve metrics on {where}: {os.strerror(exc.errno or 0).lower()}"

    # -- signals --------------------------------------------------------------------------

    def _watch_joins(self) -> None:
        # Once a minute: connections that kept one subflow while the kernel refused joins
        # (a load balancer spreading subflows?): one warning, pointing to docs/scale-out.md.
        self.joinwatch.tick()
        self._joinwatch_timer = asyncio.get_running_loop().call_later(
            tick_interval(), self._watch_joins)

    def _on_stop_signal(self) -> None:
        if self.stopping.is_set():
            self.hurry = True
            log.info("second stop signal: closing the open connections now")
        self.stopping.set()  # /ready says 503 from now on

    def _on_hangup(self) -> None:
        # systemctl reload and logrotate's postrotate: never fatal (docs/design.md).
        reopened = logsetup.reopen_log_files()
        if reopened:
            log.info("SIGHUP: reopened the log file %s", ", ".join(reopened))
        if self.config_path is None:
            log.info("SIGHUP: %sno configuration file (--config) to reload; ignored",
                     "" if reopened else "no log file to reopen and ")
            return
        if self.stopping is not None and self.stopping.is_set():
            # leaving: a listener added now would open (and divert traffic to itself)
            # after the others stopped diverting, only to be drained at once
            log.info("SIGHUP: stopping; %s is not reloaded", self.config_path)
            return
        if self._reloading is not None and not self._reloading.done():
            log.info("SIGHUP: a reload is under way; send SIGHUP again once it has ended")
            return
        from mptcpproxy.reload import reload  # noqa: PLC0415 (only with --config)

        self._reloading = asyncio.get_running_loop().create_task(reload(self))
        self._reloading.add_done_callback(_log_crash)

    # -- serve and stop -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """For /ready: serving, and no stop signal yet."""
        return self.stopping is not None and not self.stopping.is_set()

    async def serve(self) -> None:
        try:
            await self.start()
            await self._until_stopped()
            await self._grace()
            await self.drain()
        finally:
            _ignore_signals(asyncio.get_running_loop())

    async def _until_stopped(self) -> None:
        try:
            for lst in self.listeners.values():
                try:
                    lst.setup_firewall()
                except Exception as exc:  # firewall.FirewallError
                    raise StartupError(str(exc)) from None
            sd_notify("READY=1")  # listening, and the firewall rules (if any) are in place
            await self.stopping.wait()
        finally:
            for lst in self.all_listeners:
                lst.stop_diverting()  # before the drain: new connections bypass the proxy

    async def _grace(self) -> None:
        # --stop-grace: /ready already says 503; go on accepting while a load balancer's
        # health check takes this backend out, unless a second signal cuts it short.
        grace = self.config.stop_grace
        if grace <= 0 or self.hurry:
            return
        sd_notify("STOPPING=1")
        log.info("stopping: accepting for %g s more (--stop-grace), then draining", grace)
        deadline = asyncio.get_running_loop().time() + grace
        while not self.hurry and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def drain(self) -> None:
        """Stop accepting; let open pairs finish for drain_timeout, then abort them.

        A listener whose port another socket serves (a new process started beside this one,
        or systemd's copy of an activated socket) hands over: it closes as soon as the
        workers let go (after taking what is queued on it, unless systemd keeps that).
        Otherwise it stays open while the pairs drain, so that MPTCP joins of draining
        connections still arrive, and resets new connections at once."""
        loop = asyncio.get_running_loop()
        sd_notify("STOPPING=1")
        self.stopping.set()
        if self._reloading is not None:
            self._reloading.cancel()
        if self._retired_timer is not None:
            self._retired_timer.cancel()
            self._retired_timer = None
        if self._joinwatch_timer is not None:
            self._joinwatch_timer.cancel()
        for lst in self.all_listeners:
            lst.cancel_header_reads()  # a client still owing its header is not kept waiting
        for lst in list(self.listeners.values()):
            if lst.listener is None:
                continue
            if lst.activated or sockets.other_listeners(lst.listener):
                lst.hand_over(sweep=lst.activated is None)
            else:
                lst.drain()
            self.retired.append(lst)
        self.listeners.clear()
        start = loop.time()
        deadline = start + self.config.drain_timeout
        if self.relay.active:
            log.info("draining %d open connection(s), for %.0f s at most",
                     self.relay.active, self.config.drain_timeout)
        while loop.time() < deadline and not self.hurry:
            self._close_retired()
            held = any(lst.held_by_workers for lst in self.retired)
            setting_up = any(lst.connecting for lst in self.retired)  # swept clients too
            if (not self.relay.active and not setting_up
                    and (not held or loop.time() - start > 2.0)):
                break
            await asyncio.sleep(0.02)
        if self._retired_timer is not None:
            self._retired_timer.cancel()
            self._retired_timer = None
        for lst in self.retired:
            lst.cancel_setups()  # clients still waiting for their upstream or header
            if lst.held_by_workers:
                log.warning("a relay worker still polls listener %s: it is closed once the "
                            "relay has stopped", lst.title)
        loop.remove_reader(self.relay.notify_fd)
        self.relay.close()  # which also takes every listener out of the workers' epoll sets
        self._on_results()
        self.close_listeners()
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("stopped")

    def close_listeners(self) -> None:
        """Close every listener's socket; call after relay.close()."""
        for lst in self.all_listeners:
            lst.close()


def _log_crash(task: asyncio.Task) -> None:
    # A bug in a reload must not pass unseen (a task's exception is otherwise dropped).
    if not task.cancelled() and task.exception() is not None:
        log.error("reload failed", exc_info=task.exception())


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


def run(configs: Sequence[Config] | Config, config_path: str | None = None,
        cli_level: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then drain; raises StartupError when it cannot start.
    `cli_level`: -v/-q from the command line, which a reload does not override."""
    proxy = Proxy(configs, config_path)
    proxy.cli_level = cli_level
    try:
        _run_loop(proxy.serve())
    finally:
        # The relay first: closing it takes the listeners out of every worker's epoll set.
        if proxy.relay is not None:
            proxy.relay.close()
        for lst in proxy.all_listeners:
            if lst.listener is not None:
                lst.listener.close()
                lst.listener = None
    return 0
