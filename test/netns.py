"""A small network-namespace test bed for the scenario tests.

Hosts are network namespaces, links are veth pairs, and everything a test makes is
removed when its :class:`TestBed` closes — also after a failure, on Ctrl-C (context
manager / pytest finalizer) and at interpreter exit (``atexit`` safety net)::

    with TestBed("simple") as bed:            # or the ``testbed`` pytest fixture
        cli, srv = bed.host("cli"), bed.host("srv")
        l1 = bed.link(cli, srv, "10.123.200.1/24", "10.123.200.2/24")
        l2 = bed.link(cli, srv, "10.123.201.1/24", "10.123.201.2/24")
        srv.mptcp_limits(subflows=1)
        cli.mptcp_limits(subflows=1, add_addr_accepted=1)
        srv.mptcp_endpoint(l2.ip_b, l2.dev_b, "signal")
        l1.shape("100mbit")                      # tbf on both ends; l1.down() / l1.up()
        mon = cli.monitor()                      # ip mptcp monitor, subscribed once returned
        iperf = srv.start(["mptcpize", "run", "iperf3", "-s"])   # a Proc, stopped at close
        srv.wait_listening(5201, proc=iperf)
        cli.run(["mptcpize", "run", "iperf3", "-c", l1.ip_b, "-t", "1"], timeout=30)
        mon.wait_for({"CREATED": 2, "SF_ESTABLISHED": 2})
        sock = cli.connect((l1.ip_b, 5201))     # the test's own socket, made inside cli

Process helpers (``run``, ``wait_until``, ``Proc``) live in ``procs.py``, re-exported here.

Commands are argv lists (never shell strings) and every blocking call has a timeout.
Namespace names carry a random per-bed suffix, so concurrent runs never collide; the
interface names (``eth0``, ``eth1``, ... per host unless given) live inside those private
namespaces and are never created in the root namespace.
"""

from __future__ import annotations

import atexit
import ctypes
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from procs import DEFAULT_TIMEOUT, Proc, kill_pids, run, wait_until

__all__ = ["DEFAULT_TIMEOUT", "Host", "Link", "MptcpMonitor", "Proc", "TestBed", "run",
           "testbed", "wait_until"]

_LIVE: set[TestBed] = set()
_CLONE_NEWNET = 0x40000000


class Host:
    """A host: one network namespace, with ``lo`` up. Made by :meth:`TestBed.host`."""

    def __init__(self, bed: TestBed, label: str) -> None:
        self.bed, self.label = bed, label
        self.name = f"mpt-{bed.id}-{label}"
        self.devs: list[str] = []
        run(["ip", "netns", "add", self.name])
        bed._hosts.append(self)  # registered before anything else can fail
        self.ip("link", "set", "lo", "up")

    def __repr__(self) -> str:
        return f"Host({self.name})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """:func:`run` ``argv`` inside this namespace."""
        return run(self.argv(argv), timeout=timeout, check=check, input=input)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NS ARGS...``"""
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: object) -> None:
        """Set a sysctl of this namespace, e.g. ``("net.ipv4.ip_forward", 1)``."""
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def route(self, dest: str, via: str | None = None, dev: str | None = None,
              metric: int | None = None,
              nexthops: Sequence[tuple[str, int]] | None = None) -> None:
        """Add a route to ``dest`` (``"default"`` or a prefix).

        ``nexthops=[(gateway, weight), ...]`` makes an ECMP route
        (``nexthop via A weight 1 nexthop via B weight 1``).
        """
        args = ["route", "add", dest]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        if metric is not None:
            args += ["metric", str(metric)]
        for gw, weight in nexthops or ():
            args += ["nexthop", "via", gw, "weight", str(weight)]
        self.ip(*args)

    def mptcp_limits(self, subflows: int | None = None,
                     add_addr_accepted: int | None = None) -> None:
        """``ip mptcp limits set subflow N add_addr_accepted M`` (only the given ones)."""
        args = ["mptcp", "limits", "set"]
        if subflows is not None:
            args += ["subflow", str(subflows)]
        if add_addr_accepted is not None:
            args += ["add_addr_accepted", str(add_addr_accepted)]
        self.ip(*args)

    def mptcp_endpoint(self, addr: str, dev: str | None = None, flags: str = "signal") -> None:
        """``ip mptcp endpoint add ADDR [dev DEV] FLAGS``; FLAGS e.g. ``"subflow backup"``."""
        self.ip("mptcp", "endpoint", "add", addr, *(["dev", dev] if dev else []), *flags.split())

    def start(self, argv: Sequence[str], name: str | None = None,
              env: Mapping[str, str] | None = None) -> Proc:
        """Start ``argv`` in this namespace; the bed stops it (with its tree) when it closes."""
        return self.bed._register(Proc(self.argv(argv), self.bed._proc_name(name or argv[0], self),
                                       self.bed.log_dir, env))

    def listening(self, port: int) -> bool:
        """Whether a TCP (or MPTCP) socket listens on ``port`` in this namespace."""
        out = self.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        return bool(out.strip())

    def wait_listening(self, port: int, timeout: float = DEFAULT_TIMEOUT,
                       proc: Proc | None = None) -> None:
        """Wait until something listens on ``port``; fail early if ``proc`` exits."""
        def ready() -> bool:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited before listening on {port}\n{proc.describe()}")
            return self.listening(port)
        wait_until(ready, timeout, f"a listener on port {port} in {self.name}", 0.1)

    def monitor(self, timeout: float = DEFAULT_TIMEOUT) -> MptcpMonitor:
        """Start an ``ip mptcp monitor`` here and return it once it receives events."""
        return MptcpMonitor(self, timeout)

    def connect(self, addr: tuple, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        """A TCP socket of the test process itself, connected to ``addr`` in this namespace.

        Raises what ``connect()`` raises (``ConnectionRefusedError`` when nothing listens).
        """
        made: list[socket.socket | OSError] = []

        def make() -> None:
            # setns(CLONE_NEWNET) moves only the calling thread, and a socket stays in the
            # namespace it was made in: a short-lived thread makes it, any thread uses it
            try:
                with open(f"/run/netns/{self.name}") as ns:
                    if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), _CLONE_NEWNET):
                        raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
                made.append(socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET))
            except OSError as exc:  # raised in the caller's thread
                made.append(exc)

        thread = threading.Thread(target=make, name=f"setns-{self.label}")
        thread.start()
        thread.join()
        if isinstance(made[0], OSError):
            raise made[0]
        sock = made[0]
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def pids(self) -> list[int]:
        """The processes whose network namespace is this one (``ip netns pids``)."""
        res = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in res.stdout.split()]


class Link:
    """A veth pair between hosts ``a`` and ``b``, addressed and up on both ends."""

    def __init__(self, a: Host, b: Host, addr_a: str | None, addr_b: str | None,
                 dev_a: str | None = None, dev_b: str | None = None) -> None:
        self.a, self.b = a, b
        self.dev_a = dev_a or f"eth{len(a.devs)}"
        self.dev_b = dev_b or f"eth{len(b.devs)}"
        a.devs.append(self.dev_a)
        b.devs.append(self.dev_b)
        # created directly inside both namespaces: the names never exist in the root one
        run(["ip", "link", "add", self.dev_a, "netns", a.name, "type", "veth",
             "peer", "name", self.dev_b, "netns", b.name])
        for host, dev, addr in ((a, self.dev_a, addr_a), (b, self.dev_b, addr_b)):
            if addr:  # IPv6 without duplicate address detection: usable at once
                host.ip("addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
            host.ip("link", "set", dev, "up")
        self.ip_a = addr_a.split("/")[0] if addr_a else None
        self.ip_b = addr_b.split("/")[0] if addr_b else None

    def __repr__(self) -> str:
        return (f"Link({self.a.label}:{self.dev_a} {self.ip_a} <-> "
                f"{self.b.label}:{self.dev_b} {self.ip_b})")

    def ends(self) -> tuple[tuple[Host, str], tuple[Host, str]]:
        """``((host_a, dev_a), (host_b, dev_b))``."""
        return (self.a, self.dev_a), (self.b, self.dev_b)

    def shape(self, rate: str = "100mbit", burst: str = "32kb", latency: str = "20ms") -> None:
        """Token-bucket shaping (``tc qdisc replace ... root tbf``) on both ends."""
        for host, dev in self.ends():
            run(["tc", "-n", host.name, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", latency])

    def set_up(self, up: bool) -> None:
        """Take both ends down (``False``) or up again (``True``), e.g. for failover."""
        for host, dev in self.ends():
            host.ip("link", "set", dev, "up" if up else "down")

    def down(self) -> None:
        """Take both ends down."""
        self.set_up(False)

    def up(self) -> None:
        """Bring both ends up again."""
        self.set_up(True)


_EVENT = re.compile(r"^\[\s*([A-Z_]+)\]\s*(.*)$")  # "[UNKNOWN 15]" does not match: ignored


class MptcpMonitor:
    """``ip mptcp monitor`` running in a host, with events counted by exact name.

    Names are those printed without the padding: ``CREATED``, ``ESTABLISHED``,
    ``ANNOUNCED``, ``REMOVED``, ``SF_ESTABLISHED``, ``SF_CLOSED``, ``CLOSED``, ...
    Counted are only connections seen from their ``CREATED`` on, minus the probe that
    checks the monitor is subscribed, so the counts start at zero once it is returned.
    """

    def __init__(self, host: Host, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host = host
        self.proc = host.start(["ip", "mptcp", "monitor"], name="mptcp-monitor")
        self._ignored: set[str] = set()
        # the subscription is asynchronous: probe with loopback MPTCP connections until
        # one is seen, then ignore the probes' tokens
        deadline = time.monotonic() + timeout
        while True:
            port = int(host.run([sys.executable, "-c", _PROBE]).stdout)
            try:
                wait_until(lambda p=port: self._probe_done(p), 0.5, "probe events")
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ip mptcp monitor in {host.name} saw no event\n"
                                       f"{self.proc.describe()}") from None
        self.reset()

    def _events(self) -> list[tuple[str, str]]:
        """``(token, name)`` of the parsed events, in order."""
        out = []
        for line in self.proc.stdout.splitlines():
            m = _EVENT.match(line)
            if m:
                tok = re.search(r"token=(\w+)", m.group(2))
                out.append((tok.group(1) if tok else "", m.group(1)))
        return out

    def _tokens_with_port(self, port: int) -> set[str]:
        ports = re.compile(rf"\b[sd]port={port}\b")
        return {tok.group(1) for tok, line in ((re.search(r"token=(\w+)", s), s)
                                               for s in self.lines)
                if tok and ports.search(line)}

    def _probe_done(self, port: int) -> bool:
        # both ends of the loopback probe are in this namespace: two tokens, both closed
        toks = self._tokens_with_port(port)
        closed = {tok for tok, name in self._events() if name == "CLOSED"}
        return len(toks) == 2 and toks <= closed

    def reset(self) -> None:
        """Count from zero again: ignore every connection seen so far."""
        self._ignored |= {tok for tok, _ in self._events()}

    @property
    def lines(self) -> list[str]:
        """The raw output lines."""
        return self.proc.stdout.splitlines()

    def counts(self) -> Counter[str]:
        """Events by name (connections whose CREATED was seen, probes excluded)."""
        seen: set[str] = set()
        counts: Counter[str] = Counter()
        for tok, name in self._events():
            if tok in self._ignored:
                continue
            if name == "CREATED":
                seen.add(tok)
            if tok in seen or not tok:
                counts[name] += 1
        return counts

    def wait_for(self, expected: Mapping[str, int],
                 timeout: float = DEFAULT_TIMEOUT) -> Counter[str]:
        """Wait until every ``expected[name]`` count is reached; return all the counts.

        Raises ``AssertionError`` with the counts and the raw output after ``timeout``.
        """
        try:
            wait_until(lambda: all(self.counts()[k] >= v for k, v in expected.items()),
                       timeout, f"MPTCP events {dict(expected)}")
        except TimeoutError as e:
            raise AssertionError(f"{e}: got {dict(self.counts())}\n"
                                 + "\n".join(self.lines)) from None
        return self.counts()


_PROBE = """
import socket
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
c.settimeout(5); c.connect(l.getsockname()); a, _ = l.accept()
print(l.getsockname()[1]); c.close(); a.close(); l.close()
"""


class TestBed:
    """Owns hosts, links and processes; ``close()`` (or leaving ``with``) removes them all.

    Processes are stopped first (newest first, whole trees), then anything still in the
    namespaces is killed, then the namespaces — and with them the veths — are deleted.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, label: str = "bed") -> None:
        self.id = secrets.token_hex(3)
        self.label = label
        self.log_dir = tempfile.mkdtemp(prefix=f"mptcp-{self.id}-")
        self._hosts: list[Host] = []
        self._procs: list[Proc] = []
        self.links: list[Link] = []
        _LIVE.add(self)

    def __enter__(self) -> TestBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, label: str) -> Host:
        """Make a host (namespace ``mpt-<id>-<label>``) with ``lo`` up."""
        return Host(self, label)

    def link(self, a: Host, b: Host, addr_a: str | None = None, addr_b: str | None = None,
             dev_a: str | None = None, dev_b: str | None = None) -> Link:
        """Join ``a`` and ``b`` with a veth pair; addresses in CIDR form (``10.0.0.1/24``)."""
        link = Link(a, b, addr_a, addr_b, dev_a, dev_b)
        self.links.append(link)
        return link

    def _register(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def _proc_name(self, base: str, host: Host) -> str:
        return f"{len(self._procs):02d}-{host.label}-{base.rsplit('/', 1)[-1]}"

    def describe(self) -> str:
        """Argv, exit code and output of every process started, for failure messages."""
        return "\n".join(p.describe() for p in self._procs)

    def close(self) -> None:
        """Stop all processes and delete all namespaces; safe to call twice."""
        if self not in _LIVE:
            return
        _LIVE.discard(self)
        try:
            for proc in reversed(self._procs):
                proc.stop()
            for host in self._hosts:
                kill_pids(host.pids(), None, 2.0)
        finally:
            for host in self._hosts:
                run(["ip", "netns", "del", host.name], check=False)
            shutil.rmtree(self.log_dir, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    for bed in list(_LIVE):
        bed.close()


@pytest.fixture
def testbed(request: pytest.FixtureRequest):
    """A :class:`TestBed` for one test; process output is printed at teardown (shown by
    pytest only when the test failed)."""
    bed = TestBed(request.node.name)
    try:
        yield bed
    finally:
        if bed._procs:
            print(bed.describe())
        bed.close()
