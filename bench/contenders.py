"""The peers measured side by side: how each one is started in a bench namespace."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    IPERF_PORT,
    NS_SYSCTLS,
    PROXY,
    PROXY_ENV,
    PY,
    ROOT,
    TWIN,
    TWIN_ENV,
    BenchError,
    Plan,
    max_relayed,
)
from netns import Proc, TestBed


@dataclass
class Started:
    port: int  # where clients connect
    procs: list[Proc] = field(default_factory=list)  # the proxy processes measured

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class Session:
    """One private namespace with the target servers, for one peer in one run."""

    def __init__(self, bed: TestBed, loadgen: str, plan: Plan) -> None:
        self.bed, self.loadgen, self.plan = bed, loadgen, plan
        self.host = bed.host("bench")
        for key, value in NS_SYSCTLS.items():
            self.host.sysctl(key, value)
        self.next_port = 10000
        self.servers: dict[int, Proc] = {}

    def port(self) -> int:
        self.next_port += 10
        return self.next_port

    def serve(self, target: int) -> None:
        """Start the iperf3 or echo server on demand."""
        if target in self.servers:
            return
        argv = (["iperf3", "-s", "-p", str(target)] if target == IPERF_PORT
                else [self.loadgen, "echo", str(target)])
        proc = self.host.start(argv, name=f"server-{target}")
        self.host.wait_listening(target, proc=proc)
        self.servers[target] = proc

    def proxy(self, argv: list[str], port: int, name: str,
              env: dict[str, str] | None = None) -> Proc:
        proc = self.host.start(argv, name=name, env=env or PROXY_ENV)
        self.host.wait_listening(port, proc=proc)
        return proc


# mptcpproxy runs with its default logging (an INFO line per connection, to a file here)
# unless a peer asks for -q: the targets are judged on the default command line
DRAIN = ("--drain-timeout", "1")


def _mptcpproxy(boot: list[str], env: dict[str, str],
                *extra: str) -> Callable[[Session, int], Started]:
    def start(s: Session, target: int) -> Started:
        port = s.port()
        argv = [*boot, "-m", "client", "-p", str(port), "-r", f"127.0.0.1:{target}",
                *DRAIN, "--disable-mptcp", *extra]
        return Started(port, [s.proxy(argv, port, "mptcpproxy", env)])
    return start


def _pair(env: dict[str, str], *extra: str) -> Callable[[Session, int], Started]:
    """Client proxy -> MPTCP -> server proxy -> target, two processes."""
    def start(s: Session, target: int) -> Started:
        client_port, server_port = s.port(), s.port()
        server = s.proxy([*PROXY, "-m", "server", "-p", str(server_port),
                          "-r", f"127.0.0.1:{target}", *DRAIN, *extra], server_port,
                         "server-proxy", env)
        client = s.proxy([*PROXY, "-m", "client", "-p", str(client_port),
                          "-r", f"127.0.0.1:{server_port}", *DRAIN, *extra], client_port,
                         "client-proxy", env)
        return Started(client_port, [client, server])
    return start


URING = [PY, str(ROOT / "bench" / "uring_proxy.py")]


def _uring(pair: bool, *extra: str) -> Callable[[Session, int], Started]:
    """The io_uring prototype engine (bench/uring_proxy.py): TCP->TCP, or as a pair whose
    middle leg is MPTCP (the client side connects with MPTCP, the server side listens)."""
    def start(s: Session, target: int) -> Started:
        port = s.port()
        if not pair:
            return Started(port, [s.proxy([*URING, str(port), f"127.0.0.1:{target}", *extra],
                                          port, "uring")])
        server_port = s.port()
        server = s.proxy([*URING, str(server_port), f"127.0.0.1:{target}", "--mptcp-listen"],
                         server_port, "uring-server")
        client = s.proxy([*URING, str(port), f"127.0.0.1:{server_port}", "--mptcp-upstream"],
                         port, "uring-client")
        return Started(port, [client, server])
    return start


def _bare(pair: bool) -> Callable[[Session, int], Started]:
    """bench/barerelay.c, the floor: a C relay that makes only the system calls relaying
    needs. As a pair its middle leg is MPTCP, like mptcpproxy's pair."""
    def start(s: Session, target: int) -> Started:
        binary = str(Path(s.loadgen).with_name("barerelay"))  # bench.py builds it there
        port = s.port()
        if not pair:
            return Started(port, [s.proxy([binary, str(port), "127.0.0.1", str(target)],
                                          port, "barerelay")])
        server_port = s.port()
        server = s.proxy([binary, str(server_port), "127.0.0.1", str(target),
                          "--mptcp-listen"], server_port, "barerelay-server")
        client = s.proxy([binary, str(port), "127.0.0.1", str(server_port),
                          "--mptcp-upstream"], port, "barerelay-client")
        return Started(port, [client, server])
    return start


def _uring_check() -> str | None:
    """None when the io_uring prototype is built and the kernel lets it run."""
    probe = "from mptcpproxy.relay._uring import probe; print(probe() or '')"
    try:
        res = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **PROXY_ENV})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the io_uring probe failed: {exc}"
    if res.returncode:
        return "mptcpproxy.relay._uring is not built here"
    return res.stdout.strip() or None


def _has_flag(flag: str) -> Callable[[], str | None]:
    """None when this tree's mptcp-proxy knows `flag`, else why the peer is skipped."""
    def check() -> str | None:
        try:
            res = subprocess.run([*PROXY, "--help"], capture_output=True, text=True,
                                 timeout=60, env={**os.environ, **PROXY_ENV})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"mptcp-proxy --help failed: {exc}"
        return None if flag in res.stdout else f"this mptcp-proxy has no {flag}"
    return check


SPLICE_PIPES = 1024
BUSY_POLL_US = 50
HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn {maxconn}
{pipes}{busy}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 120s
    timeout server 120s
{splice}
frontend bench
    bind 127.0.0.1:{port}
    default_backend target
backend target
    server s1 127.0.0.1:{target}
"""


SPLICE_OPTIONS = {
    "": "",
    "auto": "    option splice-auto",
    # splice-auto rarely splices on loopback; these make HAProxy splice every transfer
    "forced": "    option splice-request\n    option splice-response",
}


def _haproxy_cfg(s: Session, port: int, target: int, splice: str = "",
                 busy: bool = False) -> str:
    cfg = Path(s.bed.log_dir) / f"haproxy-{port}.cfg"
    cfg.write_text(HAPROXY_CFG.format(
        threads=len(os.sched_getaffinity(0)), port=port, target=target,
        # splicing needs 2 fds per pipe too: a fixed pool of pipes, fewer connections
        maxconn=max_relayed() - (SPLICE_PIPES if splice else 0),
        pipes=f"    maxpipes {SPLICE_PIPES}" if splice else "",
        # its pollers never sleep (a null timeout), on every thread, idle or not
        busy="    busy-polling" if busy else "",
        splice=SPLICE_OPTIONS[splice]))
    return str(cfg)


def _haproxy(splice: str, busy: bool = False) -> Callable[[Session, int], Started]:
    def start(s: Session, target: int) -> Started:
        port = s.port()
        cfg = _haproxy_cfg(s, port, target, splice, busy)
        return Started(port, [s.proxy(["haproxy", "-db", "-f", cfg], port, "haproxy")])
    return start


def _haproxy_pair(s: Session, target: int) -> Started:
    """What a user deploys without mptcpproxy: HAProxy 2.6 has no MPTCP of its own, so
    both HAProxies run under `mptcpize` (every socket they open is MPTCP, as HAProxy
    >= 3.1 does natively): client -> HAProxy -> MPTCP -> HAProxy -> target. Its TCP legs
    fall back to TCP (the client and the target speak TCP)."""
    client_port, server_port = s.port(), s.port()
    wrap = ["mptcpize", "run", "haproxy", "-db", "-f"]
    server = s.proxy([*wrap, _haproxy_cfg(s, server_port, target)], server_port,
                     "haproxy-server")
    client = s.proxy([*wrap, _haproxy_cfg(s, client_port, server_port)], client_port,
                     "haproxy-client")
    # a listener that is not MPTCP would make this plain HAProxy twice: say so, not measure it
    mptcp = s.host.run(["ss", "-HMln"], timeout=10, check=False).stdout
    if f":{server_port}" not in mptcp:
        client.stop()
        server.stop()
        raise BenchError(f"HAProxy under mptcpize does not listen with MPTCP: {mptcp!r}")
    return Started(client_port, [client, server])


def _socat(s: Session, target: int) -> Started:
    port = s.port()
    # backlog=4096 like the others (socat's default is 5); one process per connection
    argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
            f"TCP:127.0.0.1:{target}"]
    return Started(port, [s.proxy(argv, port, "socat")])


def variant_peer(spec: str) -> Peer:
    """`KEY=ROOT[::ARGS]`: mptcpproxy TCP->TCP from another tree (a lever to measure), or
    the proxy pair from it when KEY starts with "pair"."""
    key, _, rest = spec.partition("=")
    root, _, args = rest.partition("::")
    env = {**PROXY_ENV, "PYTHONPATH": str(Path(root or ROOT).resolve())}

    def start(s: Session, target: int) -> Started:
        port = s.port()
        argv = [*PROXY, "-m", "client", "-p", str(port), "-r",
                f"127.0.0.1:{target}", *DRAIN, "--disable-mptcp", *args.split()]
        return Started(port, [s.proxy(argv, port, key, env)])
    return Peer(key, _pair(env, *args.split()) if key.startswith("pair") else start)


@dataclass(frozen=True)
class Peer:
    key: str
    start: Callable[[Session, int], Started] | None  # None: no proxy
    needs: str | None = None  # a program that must be installed
    max_hold: int = 1 << 30  # the most idle connections it is asked to hold
    groups: tuple[str, ...] = ()  # the only measurement groups it takes part in; (): all
    spins: bool = False  # busy even when idle: stopped as soon as it was measured
    # None when it can run here, else why it is skipped (checked once, at the start)
    check: Callable[[], str | None] | None = None
    optional: bool = False  # only in a run whose --peers names it


PATH_STATS_OFF = "--no-path-stats"
PEERS = [
    Peer("direct", None),
    Peer("tcp", _mptcpproxy(PROXY, PROXY_ENV)),
    # what the per-connection log line costs
    Peer("tcp-quiet", _mptcpproxy(PROXY, PROXY_ENV, "-q"), groups=("tput", "echo")),
    # the set-ups a user picks for bulk (less CPU per byte) and for latency
    Peer("tcp-splice", _mptcpproxy(PROXY, PROXY_ENV, "--splice"), groups=("tput",)),
    Peer("tcp-busy", _mptcpproxy(PROXY, PROXY_ENV, f"--busy-poll={BUSY_POLL_US}"),
         groups=("echo",)),
    Peer("py", _mptcpproxy(TWIN, TWIN_ENV)),
    Peer("haproxy", _haproxy(""), "haproxy"),
    Peer("haproxy-busy", _haproxy("", busy=True), "haproxy", groups=("echo",), spins=True),
    # their pipes take fds that 10,000 connections need; idle, they are the same as HAProxy
    Peer("haproxy-splice", _haproxy("auto"), "haproxy", max_hold=1000),
    Peer("haproxy-splice-forced", _haproxy("forced"), "haproxy", max_hold=1000),
    # a process per connection: 10,000 of them would be 10,000 forks
    Peer("socat", _socat, "socat", max_hold=1000),
    # the product's own job, next to what a user would deploy instead
    Peer("pair", _pair(PROXY_ENV)),
    # the per-path sampling of MPTCP subflows off (the flag comes with that sampling)
    Peer("pair-no-paths", _pair(PROXY_ENV, PATH_STATS_OFF), groups=("tput", "echo"),
         check=_has_flag(PATH_STATS_OFF)),
    Peer("haproxy-pair", _haproxy_pair, "mptcpize", groups=("tput", "echo")),
    # the floor: what a relay doing nothing but its system calls reaches on this machine
    Peer("bare", _bare(pair=False), groups=("tput", "echo")),
    Peer("bare-pair", _bare(pair=True), groups=("tput", "echo")),
    # issue 16's io_uring prototype (bench/uring_proxy.py): measured only when asked for
    Peer("uring", _uring(pair=False), check=_uring_check, optional=True),
    Peer("uring-pair", _uring(pair=True), check=_uring_check, groups=("tput", "echo"),
         optional=True),
    # one multishot accept per worker: the first worker takes every connection
    Peer("uring-ms", _uring(False, "--multishot-accept"), check=_uring_check,
         groups=("echo",), optional=True),
]
