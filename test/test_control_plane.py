"""The control plane against a real relay, in this process: how it reports what the relay
collects at the stop, who closes the listener and when, and a relay that refuses a pair."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import signal
import socket
import time

import pytest
from test_metrics import uvloop_primed  # noqa: F401  (a module fixture: libuv's global pipe)
from test_reload import write_config

from mptcpproxy import configfile, control, listener
from mptcpproxy.config import Config, HostPort
from mptcpproxy.control import Proxy, _run_loop
from mptcpproxy.relay import Relay

TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def keep_signal_dispositions():
    """The proxy installs (and at its stop ignores) signal handlers: give them back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM,
                                                    signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mptcpproxy")
    return caplog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(upstream: socket.socket, **options) -> Config:
    return Config(mode="client", port=free_port(), bind="127.0.0.1",
                  remote=HostPort("127.0.0.1", upstream.getsockname()[1]),
                  disable_mptcp=True, workers=1, **options)


def closed_by_proxy(client: socket.socket) -> bool:
    """The proxy closed this client (FIN or RST) without a byte."""
    client.settimeout(TIMEOUT)
    try:
        return client.recv(16) == b""
    except ConnectionResetError:
        return True


def only_listener(proxy: Proxy):
    (listener,) = proxy.all_listeners
    return listener


def wait_until(pred, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class WatchedRelay:
    """The real relay, watched: it records whether the listener it was given was still
    open when it was closed; `stuck` plays a worker that never lets go of the listener;
    `refuse` makes add() fail as the engine does (it closes both fds, then raises)."""

    stuck = False
    refuse: OSError | None = None
    instances: list[WatchedRelay] = []

    def __init__(self, *args) -> None:
        self._relay = Relay(*args)
        self.listener: tuple[int, int] | None = None  # (fd, inode)
        self.listener_open_at_close: bool | None = None
        type(self).instances.append(self)

    def __getattr__(self, name: str):
        return getattr(self._relay, name)

    def listen(self, fd: int, *args, **kwargs) -> None:
        self.listener = (fd, os.fstat(fd).st_ino)
        self._relay.listen(fd, *args, **kwargs)

    @property
    def listening(self) -> bool:
        return self.stuck or self._relay.listening

    def holds(self, fd: int) -> bool:
        return self.stuck or self._relay.holds(fd)

    def add(self, fd_a: int, fd_b: int, conn_id: int, mptcp_fd: int = -1, **kwargs) -> None:
        if self.refuse is not None:
            os.close(fd_a)
            os.close(fd_b)
            raise self.refuse
        self._relay.add(fd_a, fd_b, conn_id, mptcp_fd, **kwargs)

    def close(self) -> None:
        if self.listener_open_at_close is None and self.listener is not None:
            fd, inode = self.listener
            try:
                self.listener_open_at_close = os.fstat(fd).st_ino == inode
            except OSError:
                self.listener_open_at_close = False
        self._relay.close()


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> type[WatchedRelay]:
    class Watched(WatchedRelay):
        instances: list[WatchedRelay] = []

    monkeypatch.setattr(control, "Relay", Watched)
    return Watched


def test_connect_failures_collected_at_the_stop_are_failures(proxy_log) -> None:
    """Two clients whose upstream refuses, then the stop at once: the relay's results are
    collected by the drain, and each is a connect failure, never a closed connection."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        upstream = f"127.0.0.1:{refusing.getsockname()[1]}"
        proxy = Proxy(config(refusing))

        async def scenario() -> None:
            await proxy.start()
            assert only_listener(proxy).fast
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", proxy.config.port),
                                              timeout=TIMEOUT) as client:
                    assert closed_by_proxy(client)
            # SIGTERM now: the workers let go of the listener before the loop has read the
            # relay's results, so the drain is the one that collects them.
            proxy.relay.unlisten()
            wait_until(lambda: not proxy.relay.listening, "the workers to drop the listener")
            await proxy.drain()

        _run_loop(scenario())
    text = proxy_log.text
    assert text.count(f"upstream {upstream} failed: connection refused") == 2, text
    assert not re.search(r"conn \d+ failed", text), text
    assert only_listener(proxy).metrics.connect_failures["refused"] == 2
    assert sum(only_listener(proxy).metrics.closed.values()) == 0


def test_drain_keeps_the_listener_while_a_worker_has_it(watched, proxy_log) -> None:
    """A worker that does not let go of the listener: the drain does not close it under
    the worker's feet; it is closed after the relay (which takes it out of every epoll
    set)."""
    watched.stuck = True
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        proxy = Proxy(config(refusing))

        async def scenario() -> None:
            await proxy.start()
            await proxy.drain()

        _run_loop(scenario())
    (relay,) = watched.instances
    assert relay.listener_open_at_close is True
    assert only_listener(proxy).listener is None
    assert "stopped" in proxy_log.text


def test_run_closes_the_relay_before_the_listener(watched, monkeypatch) -> None:
    """A failure after the start: run() still closes the relay first, then the listener."""
    def failing_notify(state: str) -> None:
        if state == "READY=1":
            raise RuntimeError("the notify socket failed")

    monkeypatch.setattr(control, "sd_notify", failing_notify)
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        with pytest.raises(RuntimeError, match="notify socket"):
            control.run(config(refusing))
    (relay,) = watched.instances
    assert relay.listener_open_at_close is True


def test_a_pair_the_relay_refuses_leaks_nothing(watched, proxy_log) -> None:
    """Relay.add fails (it has closed both fds): the client is closed, the failure logged
    and counted, and the control plane keeps no entry for the connection."""
    watched.refuse = OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(8)
        # a limit: the control plane accepts and connects, then hands the pair over
        proxy = Proxy(config(upstream, max_connections=100))

        async def scenario() -> None:
            await proxy.start()
            assert not only_listener(proxy).fast
            loop = asyncio.get_running_loop()
            with socket.socket() as client:
                client.setblocking(False)
                await asyncio.wait_for(
                    loop.sock_connect(client, ("127.0.0.1", proxy.config.port)), TIMEOUT)
                try:
                    got = await asyncio.wait_for(loop.sock_recv(client, 16), TIMEOUT)
                except ConnectionResetError:
                    got = b""
                assert got == b""
            await proxy.drain()

        _run_loop(scenario())
    assert proxy.conns == {}
    assert not only_listener(proxy).connecting
    assert "cannot be relayed: cannot allocate memory" in proxy_log.text, proxy_log.text
    assert only_listener(proxy).metrics.closed["error"] == 1
    assert "Traceback" not in proxy_log.text


def test_a_reload_under_way_at_the_stop_adds_no_listener(tmp_path, monkeypatch,
                                                          proxy_log) -> None:
    """SIGHUP, then SIGTERM while the reload still resolves a new listener's upstream
    name: the reload must not go on to open that listener (and install its rules) during
    --stop-grace, after the others stopped diverting. Before the fix the added port
    accepted during the grace."""
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(8)
        up = upstream.getsockname()[1]
        port, added = free_port(), free_port()
        path = tmp_path / "proxy.toml"
        base = {"mode": "client", "port": port, "bind": "127.0.0.1", "disable_mptcp": True,
                "remote": f"127.0.0.1:{up}"}
        write_config(path, [base], workers=1, stop_grace=2)
        proxy = Proxy(configfile.load(str(path)).listeners, str(path))
        write_config(path, [base, {**base, "port": added, "remote": f"localhost:{up}"}],
                     workers=1, stop_grace=2)
        real_resolve = listener.resolve

        async def scenario() -> None:
            entered, release = asyncio.Event(), asyncio.Event()

            async def slow_resolve(loop, target):  # a slow DNS answer
                entered.set()
                await release.wait()
                return await real_resolve(loop, target)

            monkeypatch.setattr(listener, "resolve", slow_resolve)
            serving = asyncio.ensure_future(proxy.serve())
            while not proxy.ready:
                await asyncio.sleep(0.01)
            proxy._on_hangup()
            await asyncio.wait_for(entered.wait(), TIMEOUT)
            proxy._on_stop_signal()
            while "--stop-grace" not in proxy_log.text:
                await asyncio.sleep(0.01)
            release.set()
            await asyncio.wait_for(asyncio.shield(proxy._reloading), TIMEOUT)
            try:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", added), timeout=TIMEOUT).close()
            finally:
                proxy._on_stop_signal()  # a second one: no more grace
                await asyncio.wait_for(serving, TIMEOUT)

        _run_loop(scenario())
    assert "stopped" in proxy_log.text
