"""One listener of the proxy: a port with its own configuration, served by the shared
relay. It owns its listening socket (opened here, or passed by systemd), its transparent
mode and firewall rules, and the connections it is setting up; the relay owns the pairs.

Life: prepare() (checks, the socket) -> start() (the workers' fast path, or the control
plane's accept path) -> [update() with a new configuration for new connections] ->
stop_accepting() -> close() once no worker holds the socket. A listener removed by a
reload drains: new connections are reset at once, open ones go on, and the socket is
closed when the last has ended (an MPTCP join of an open connection can still arrive).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from mptcpproxy import origdst, sdlisten, sockets
from mptcpproxy.accepting import Accepting
from mptcpproxy.config import Config
from mptcpproxy.connect import Attempt, literal, resolve
from mptcpproxy.connlog import Conn, reason
from mptcpproxy.proxyhdr import HeaderRead

log = logging.getLogger("mptcpproxy")

_LINGER_RST = b"\x01\0\0\0\0\0\0\0"  # struct linger {1, 0}: close() sends a reset


class ListenerError(Exception):
    """This listener cannot start; the message is one sentence for a person."""


class Listener(Accepting):
    def __init__(self, config: Config, tag: int, relay, metrics, conns: dict[int, Conn]) -> None:
        self.config = config
        self.tag = tag  # the relay's tag for its pairs (Result.tag, open_pairs)
        self.relay = relay
        self.metrics = metrics
        self.conns = conns  # shared by every listener: conn id -> Conn
        self.listener: socket.socket | None = None
        self.connecting: set[Attempt] = set()
        self.fast = False  # the relay workers accept and connect themselves
        self.draining = False  # removed by a reload: resets new connections, then closes
        self.handing_over = False  # another socket serves the port: close once let go
        self.sweep_on_close = True
        self.gone_at: int | None = None  # Proxy._collects when it was closed and empty
        self.stopping = asyncio.Event()
        self.transparent: origdst.Transparent | None = None
        self.firewall = None  # firewall.Method with --setup-firewall
        self._last_warning: dict[str, float] = {}
        self._accept_paused = False
        self._resolving: asyncio.Task | None = None
        self.activated: str | None = None  # the name of the socket systemd passed

    @property
    def label(self) -> str:
        """Its `listener` label in the metrics (the port)."""
        return self.config.label

    @property
    def title(self) -> str:
        """Its name in log lines (its name, else its port)."""
        return self.config.title

    @property
    def open_count(self) -> int:
        """Its connections: being set up here, or relayed."""
        return len(self.connecting) + self.relay.open_pairs(self.tag)

    # -- start ----------------------------------------------------------------------------

    async def prepare(self, passed: list[sdlisten.Passed]) -> None:
        """Everything that can fail, before anything is served: raises ListenerError."""
        cfg = self.config
        if cfg.transparent or cfg.mark or cfg.source:
            self._prepare_transparent()
        if cfg.remote is not None and cfg.remote.is_literal:
            try:
                literal(cfg.remote)  # a scope names an interface: it must exist
            except OSError as exc:
                raise ListenerError(f"cannot connect to {cfg.remote}: {exc.strerror}: "
                                    "give the interface after % as `ip link` shows it"
                                    ) from None
        elif cfg.remote is not None:
            try:
                await resolve(asyncio.get_running_loop(), cfg.remote)
            except OSError as exc:
                raise ListenerError(
                    f"cannot resolve the remote host '{cfg.remote.host}' ({reason(exc)}): "
                    "check the name or give an IP address") from None
        try:
            activated = sdlisten.match(passed, cfg)
        except ValueError as exc:  # config.ConfigError
            raise ListenerError(str(exc)) from None
        if activated is not None:
            self.listener, self.activated = activated.sock, activated.name
            if cfg.transparent == "tproxy":
                sockets.set_transparent(self.listener)
            return
        try:
            self.listener = sockets.make_listener(
                cfg.bind, cfg.port, cfg.listen_mptcp, cfg.backlog,
                transparent=cfg.transparent == "tproxy")
        except OSError as exc:
            raise ListenerError(self._listen_error(exc)) from None

    def _prepare_transparent(self) -> None:
        from mptcpproxy import conntrack, firewall, srcaddr

        cfg = self.config
        if cfg.mark:
            try:
                sockets.stream_socket(socket.AF_INET, False, cfg.mark).close()
            except PermissionError:
                raise ListenerError("--mark needs CAP_NET_ADMIN: run as root, or leave out "
                                    "--mark and exclude the proxy's user in the rules") from None
        if cfg.source and (why := srcaddr.prepare(cfg, self.label)):
            raise ListenerError(why)
        if cfg.transparent:
            self.transparent = origdst.Transparent(cfg.transparent, cfg.port, cfg.remote)
        if cfg.transparent == "redirect" and cfg.listen_mptcp:
            why = conntrack.probe()  # the original destination of MPTCP comes from there
            if why:
                raise ListenerError(why)
        if cfg.setup_firewall:  # -t, or --source client
            self.firewall = firewall.method_for(cfg)
            why = self.firewall.unsupported_reason()
            if why:
                raise ListenerError(why)

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
        if isinstance(exc, socket.gaierror):  # fe80::1%eth9: the scope's interface
            return (f"cannot listen on {cfg.bind}: no interface of that name "
                    f"({exc.strerror}): give the interface after % as `ip link` shows it")
        if exc.errno in (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EINVAL) and (
                cfg.listen_mptcp and (why := sockets.mptcp_unavailable())):
            return why
        if exc.errno == errno.EINVAL and cfg.bind:  # the socket was fine: the address is not
            return (f"cannot listen on {cfg.bind}: the kernel refuses that address (a "
                    "link-local one needs its interface, as fe80::1%eth0; an IPv4 one is "
                    "written without ::ffff:)")
        return f"cannot listen on {where}: {os.strerror(exc.errno or 0)}"

    def start(self) -> None:
        """Serve: the workers accept (a fixed upstream address) or the control plane does."""
        cfg = self.config
        self.fast = self._can_be_fast(cfg)
        if self.fast:
            self._listen_fast()
        else:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._on_accept)
        log.info(
            "listener %s: listening on %s (%s%s), forwarding to %s over %s",
            self.title, sockets.peer_name(self.listener.getsockname()),
            f"socket from systemd: {self.activated}, " if self.activated else "",
            "MPTCP" if cfg.listen_mptcp else "TCP",
            f"the original destination (-t {cfg.transparent}"
            + (f"; not intercepted: {cfg.remote})" if cfg.remote else ")")
            if cfg.transparent else cfg.remote,
            "MPTCP" if cfg.upstream_mptcp else "TCP",
        )

    def _can_be_fast(self, cfg: Config) -> bool:
        # A fixed upstream address needs no decision per connection: the relay workers
        # accept and connect themselves, no Python runs until the connection's end. At
        # DEBUG level the control plane accepts, so that each set-up is logged; a PROXY
        # header or a source address is the control plane's work too.
        return (self.transparent is None and cfg.remote.is_literal and not cfg.per_connection
                and not cfg.max_connections and not log.isEnabledFor(logging.DEBUG))

    def _listen_fast(self) -> None:
        cfg = self.config
        family, sockaddr = literal(cfg.remote)
        mptcp_side = -1 if cfg.disable_mptcp else 1 if cfg.upstream_mptcp else 0
        self.relay.listen(self.listener.fileno(), family, sockaddr, cfg.upstream_mptcp,
                          mptcp_side, cfg.mark, cfg.connect_timeout, tag=self.tag,
                          idle_timeout=cfg.idle_timeout, splice=cfg.splice)

    def update(self, config: Config) -> None:
        """A new configuration for the same socket (config.same_socket): new connections
        follow it, open ones keep theirs."""
        was_fast = self.fast
        self.config = config
        fast = self._can_be_fast(config)
        if was_fast and fast:
            self._listen_fast()  # the workers take the new settings for new clients
            return
        loop = asyncio.get_running_loop()
        if was_fast:
            self.relay.unlisten(self.listener.fileno())
        else:
            loop.remove_reader(self.listener.fileno())
        self.fast = fast
        if fast:
            self._listen_fast()
        else:
            loop.add_reader(self.listener.fileno(), self._on_accept)

    # -- stop -----------------------------------------------------------------------------

    def stop_accepting(self, cancel: bool = True) -> None:
        """No new connection from now on; connections being set up are given up (with
        `cancel`: the process stops) or go on (a reload)."""
        self.stopping.set()
        if self.listener is None:
            return
        if self.fast:
            self.relay.unlisten(self.listener.fileno())
        else:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
        if self._resolving is not None:
            self._resolving.cancel()
        if cancel:
            self.cancel_setups()

    def cancel_header_reads(self) -> None:
        """A stop: close the clients still owing their PROXY header (the others go on)."""
        for read in [a for a in self.connecting if isinstance(a, HeaderRead)]:
            read.cancel()
            self.connecting.discard(read)

    def cancel_setups(self) -> None:
        """Give up the connections still being set up (their clients are closed)."""
        for attempt in list(self.connecting):
            attempt.cancel()
        self.connecting.clear()

    def hand_over(self, sweep: bool = True) -> None:
        """Another socket serves the port (a reload's replacement or a new process beside
        this one, SO_REUSEPORT; or systemd's copy of an activated socket). This one stops
        accepting; once the workers let go, sweep() takes the clients still queued on it
        (unless systemd keeps them for the next process) and close() follows, so that none
        of them is reset."""
        if self.draining:  # a reload added its port back: it resets no more clients
            self.draining = False
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
        else:
            self.stop_accepting(cancel=False)
        self.handing_over = True
        self.sweep_on_close = sweep

    def sweep(self) -> None:
        """Accept what still waits in this socket's backlog and set it up as usual."""
        while self.listener is not None:
            try:
                conn, addr = self.listener.accept()
            except OSError:
                return
            self.metrics.connection_accepted()
            conn.setblocking(False)
            self._set_up(conn, addr, None)

    def drain(self) -> None:
        """Removed by a reload: stop accepting, reset what arrives meanwhile (a backlog
        nobody serves would hold clients until the close), keep the socket for the joins
        of open MPTCP connections, close it once the last connection has ended."""
        self.stop_accepting(cancel=False)
        self.draining = True
        if self.listener is not None:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._reset_new)

    def _reset_new(self) -> None:
        if sockets.other_listeners(self.listener):
            # a successor started beside it since (SO_REUSEPORT): it serves the port now;
            # this one takes what is queued on it and closes (Results._close_retired)
            self.hand_over()
            return
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            conn.close()
            self.metrics.connection_rejected()

    @property
    def held_by_workers(self) -> bool:
        return self.listener is not None and self.relay.holds(self.listener.fileno())

    def close(self) -> None:
        """Close the socket (the caller made sure no worker holds it) and remove the
        firewall rules if they are still in place."""
        if self.listener is not None:
            if self.draining:
                self.draining = False
                asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.restore_firewall()

    def setup_firewall(self) -> None:
        if self.firewall is not None:
            self.firewall.setup_firewall()  # raises firewall.FirewallError

    def stop_diverting(self) -> None:
        """It stops serving: new connections flow as if the proxy were not there; the rules
        its open connections need (TPROXY, --source client) go when the socket closes,
        after its last connection."""
        if self.firewall is not None:
            self.firewall.stop_diverting()

    def restore_firewall(self) -> None:
        if self.firewall is not None:
            # new connections then flow as if the proxy were not there
            self.firewall.restore_firewall()
