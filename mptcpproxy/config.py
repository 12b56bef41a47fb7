"""Configuration: frozen dataclasses and address parsing with messages for people."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration value a person must fix; the message is one sentence."""


# Bounds of the numeric options: the command line refuses anything outside them, since the
# engine could not hold it (it keeps times in int64 nanoseconds, sizes in C integers) or it
# could only be a typo.
# Timeouts, in seconds: at least 1 ms (a shorter one rounds to 0 ns in the engine, where an
# idle timeout of 0 means never and a connect timeout of 0 fails every connection), at most
# a week.
MIN_SECONDS, MAX_SECONDS = 0.001, 7 * 24 * 3600
# Relay threads: more than CPUs only adds switching, and each holds a read buffer, an epoll
# and an eventfd; 256 covers the largest machine one process should drive, and a fixed
# bound keeps a unit file valid on every host. The default, one per CPU, stays below it.
MAX_WORKERS = 256
# Relay buffer, in KiB: the engine's minimum, and 64 MiB (a stalled receiver may make a
# connection hold twice that).
MIN_BUFFER_KIB, MAX_BUFFER_KIB = 4, 64 * 1024
# Busy polling after an event, in microseconds: a CPU spinning longer than a second buys no
# latency.
MAX_BUSY_POLL_USEC = 1_000_000
# Open connections: each needs two fds, and no kernel lets a process open 2e9 of them.
MAX_CONNECTIONS = 1_000_000_000


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @property
    def is_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_port(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise ConfigError(f"'{text}' is not a port number (use 1-65535)") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range (use 1-65535)")
    return port


def parse_hostport(text: str) -> HostPort:
    """Parse `10.0.1.2:4444`, `[2001:db8::2]:4444` or `name:4444`."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"'{text}' needs a port: write an IPv6 address as [ADDR]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"'{host}' in '{text}' is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"'{text}' has no port: write HOST:PORT, for example 10.0.1.2:4444")
        if not host:  # not "every address": --metrics would be open to all without a word
            raise ConfigError(f"'{text}' has no host: write HOST:PORT, for example "
                              f"127.0.0.1:{parse_port(port_text)}")
        if ":" in host:
            raise ConfigError(
                f"'{text}' looks like an IPv6 address: write it in brackets, as [ADDR]:PORT"
            )
    return HostPort(host, parse_port(port_text))


def parse_bind(text: str) -> str:
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"'{text}' is not an IP address to bind to") from None


def parse_port_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """Parse `80,443,8000-8100` into ((80, 80), (443, 443), (8000, 8100))."""
    ranges = []
    for item in text.split(","):
        item = item.strip()
        low, sep, high = item.partition("-")
        if not item or (sep and not (low and high)):
            raise ConfigError(f"'{text}' is not a port list: write e.g. 80,443,8000-8100")
        first = parse_port(low)
        last = parse_port(high) if sep else first
        if last < first:
            raise ConfigError(f"the port range '{item}' is reversed: write {last}-{first}")
        ranges.append((first, last))
    return tuple(ranges)


def parse_mark(text: str) -> int:
    """A firewall mark: decimal or 0x-hexadecimal, 1 to 0xffffffff."""
    try:
        mark = int(text, 0)
    except ValueError:
        raise ConfigError(f"'{text}' is not a mark: write a number like 1 or 0x10") from None
    if not 1 <= mark <= 0xFFFFFFFF:
        raise ConfigError(f"mark {text} is out of range (use 1 to 0xffffffff)")
    return mark


@dataclass(frozen=True)
class Config:
    mode: str  # "client": TCP in, MPTCP out; "server": MPTCP in, TCP out
    port: int
    remote: HostPort | None
    bind: str | None = None  # None: dual-stack "::", or "0.0.0.0" where IPv6 is off
    disable_mptcp: bool = False
    workers: int = 0  # 0: one per CPU
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0  # 0: never close idle connections
    drain_timeout: float = 30.0
    stop_grace: float = 0.0  # seconds of accepting on after the stop signal (/ready: 503)
    max_connections: int = 0  # 0: no limit
    buffer_size: int = 512 * 1024  # bytes a relay read takes, and the most kept per direction
    splice: bool = False  # bulk transfers go through a pipe with splice()
    busy_poll: float = 0.0  # seconds a relay thread polls on after an event; 0: sleeps at once
    path_stats: bool = True  # sample each MPTCP connection's subflows (paths, path metrics)
    backlog: int = 4096
    # transparent mode (docs/transparent.md)
    transparent: str | None = None  # None, "redirect" or "tproxy"
    mark: int = 0  # SO_MARK on every upstream connection; 0: none
    setup_firewall: bool = False  # install our nftables table (+ TPROXY routing) while running
    intercept: tuple[tuple[int, int], ...] = ()  # port ranges to intercept; (): all TCP
    metrics: HostPort | None = None  # --metrics: serve Prometheus metrics there
    # keeping the client's address (docs: README "Keeping the client's address")
    send_proxy: str | None = None  # "v1" or "v2": a PROXY header first on each upstream
    accept_proxy: bool = False  # each client must start with a PROXY header
    proxy_timeout: float = 5.0  # seconds for the whole header (--accept-proxy)
    source: str | None = None  # "client": connect upstream from the client's address
    name: str | None = None  # a [[listener]]'s name: its socket-activation name and label

    @property
    def label(self) -> str:
        """What names this listener in logs and metrics (the `listener` label): its port.
        (A [[listener]]'s `name` is for socket activation, logs and --check-config.)"""
        return str(self.port)

    @property
    def title(self) -> str:
        """What names this listener in log lines: its name, else its port."""
        return self.name or str(self.port)

    def with_name(self, name: str | None) -> Config:
        return dataclasses.replace(self, name=name)

    def same_socket(self, other: Config) -> bool:
        """Whether `other` can take over this listener's socket as it is (only the
        handling of new connections changes)."""
        # the firewall rules and what start-up checks for them come with the socket too
        def key(c: Config) -> tuple:
            return (c.port, c.bind, c.listen_mptcp, c.transparent, c.setup_firewall,
                    c.intercept, c.source, c.mark if c.setup_firewall else 0)
        return key(self) == key(other)

    @property
    def per_connection(self) -> bool:
        """Each connection needs the control plane (a PROXY header to read or write, a
        source address to bind), not the relay workers' own accept."""
        return self.accept_proxy or self.send_proxy is not None or self.source is not None

    @property
    def listen_mptcp(self) -> bool:
        return self.mode == "server" and not self.disable_mptcp

    @property
    def upstream_mptcp(self) -> bool:
        return self.mode == "client" and not self.disable_mptcp

    @property
    def worker_count(self) -> int:
        return self.workers or min(len(os.sched_getaffinity(0)) or 1, MAX_WORKERS)
