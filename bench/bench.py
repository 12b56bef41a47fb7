"""`make bench`: mptcpproxy side by side with no proxy, HAProxy and socat.

Every peer runs in a private network namespace made for it (loopback only), with a
fresh iperf3 server and echo server, and is measured on: 1- and 8-stream throughput
(iperf3 -J) with the proxy's CPU seconds per GB, ping-pong round trips/s and their
latency, new connections/s and their set-up time, 1000 simultaneous connects, and the
memory held per idle connection (1000 and 10,000 held). Then two namespaces joined by two
100 Mbit/s paths compare the proxy pair with MPTCP sockets used directly and with one TCP
path, and a path is cut in the middle of a checksummed transfer.

Each figure is the median of 3 runs (the runs interleave the peers, so a burst of load on
this shared machine hits them all alike). Results: bench/results/<stamp>.jsonl (one JSON
object a line), the table in bench/README.md and the chart bench/ratios.png.

    python bench/bench.py                   the full suite (about 9 minutes)
    BENCH_QUICK=1 python bench/bench.py     one run, short durations (about 100 seconds)
    python bench/bench.py --smoke --out DIR one metric, one peer, about a second
    python bench/bench.py --report FILE     table and chart again from a results file

Needs root (network namespaces). Everything it starts is stopped and every namespace is
deleted at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "test"))
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from netns import Host, Proc, TestBed, wait_until  # noqa: E402  (the scenario tests' bed)

PY = sys.executable
# the proxies import this checkout's mptcpproxy, and the C engine or nothing: a bench that
# silently measured the pure-Python twin would be worse than none
PROXY_ENV = {"PYTHONPATH": str(ROOT), "MPTCPPROXY_REQUIRE_EXTENSION": "1"}
TWIN_ENV = {"PYTHONPATH": str(ROOT), "MPTCPPROXY_REQUIRE_EXTENSION": "0"}
XFER = str(ROOT / "test" / "xfer.py")
IPERF_PORT, ECHO_PORT = 5201, 7000
# 10,000 connections relayed: 20,000 fds in one proxy process. Where the hard limit is
# lower and cannot be raised (no CAP_SYS_RESOURCE), as many as it allows are held.
NOFILE = 65536
FD_RESERVE = 100  # listeners, epoll and event fds of a proxy
# `python -m` and `-c` put the working directory first on sys.path, ahead of PYTHONPATH:
# the boot drops it, so that PYTHONPATH alone says which tree's mptcpproxy runs.
BOOT = "import sys; sys.path.pop(0); from mptcpproxy.cli import main; sys.exit(main())"
PROXY = [PY, "-c", BOOT]
# The pure-Python twin, forced without touching the package: a None entry in sys.modules
# makes `import mptcpproxy._relay` fail, so relay.py falls back to _relay_py.
TWIN = [PY, "-c", BOOT.replace("from mptcpproxy", "sys.modules['mptcpproxy._relay'] = None; "
                                                  "from mptcpproxy", 1)]
NS_SYSCTLS = {
    # 10,000 held connections and the connection-rate test churn through ports quickly;
    # the listeners' ports (10000-19999) stay out of the range
    "net.ipv4.ip_local_port_range": "20000 65535",
    "net.core.somaxconn": 65535,
    "net.ipv4.tcp_max_syn_backlog": 65535,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# -- what a run does ------------------------------------------------------------------------

@dataclass
class Plan:
    runs: int = 3
    iperf_seconds: int = 3
    pingpong_seconds: float = 2.0
    connrate_seconds: float = 2.0
    connrate_concurrency: int = 8
    burst: int = 1000
    holds: tuple[int, ...] = (1000, 10_000)
    shaped_seconds: int = 5
    shaped_runs: int = 3
    cut_bytes: int = 64 << 20
    groups: tuple[str, ...] = ("tput", "echo", "hold", "shaped", "cut")
    peers: tuple[str, ...] = ()  # empty: all

    @classmethod
    def quick(cls) -> Plan:
        return cls(runs=1, iperf_seconds=1, pingpong_seconds=0.5, connrate_seconds=0.5,
                   holds=(1000,), shaped_seconds=2, shaped_runs=1, cut_bytes=32 << 20)

    @classmethod
    def smoke(cls) -> Plan:
        return cls(runs=1, pingpong_seconds=0.3, groups=("echo-pingpong",), peers=("tcp",))


# -- processes: CPU time and memory from /proc ----------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name may hold spaces and parentheses: split after the last ')'
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(roots: Iterable[int]) -> float:
    """utime + stime of the process trees, all threads, reaped children included."""
    ticks = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields:  # fields[11:15]: utime stime cutime cstime
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def memory_kib(roots: Iterable[int]) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB summed over the process trees.

    Pss divides shared pages among the processes sharing them: the fair sum for socat,
    which forks a process per connection."""
    rss = pss = 0
    for pid in process_tree(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


# -- the peers ------------------------------------------------------------------------------

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


def _mptcpproxy(boot: list[str], env: dict[str, str],
                *extra: str) -> Callable[[Session, int], Started]:
    def start(s: Session, target: int) -> Started:
        port = s.port()
        argv = [*boot, "-m", "client", "-p", str(port), "-r", f"127.0.0.1:{target}",
                "-q", "--drain-timeout", "1", "--disable-mptcp", *extra]
        return Started(port, [s.proxy(argv, port, "mptcpproxy", env)])
    return start


def _pair(s: Session, target: int) -> Started:
    client_port, server_port = s.port(), s.port()
    common = ["-q", "--drain-timeout", "1"]
    server = s.proxy([*PROXY, "-m", "server", "-p", str(server_port),
                      "-r", f"127.0.0.1:{target}", *common], server_port, "server-proxy")
    client = s.proxy([*PROXY, "-m", "client", "-p", str(client_port),
                      "-r", f"127.0.0.1:{server_port}", *common], client_port, "client-proxy")
    return Started(client_port, [client, server])


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


def _haproxy(splice: str, busy: bool = False) -> Callable[[Session, int], Started]:
    def start(s: Session, target: int) -> Started:
        port = s.port()
        cfg = Path(s.bed.log_dir) / f"haproxy-{port}.cfg"
        cfg.write_text(HAPROXY_CFG.format(
            threads=len(os.sched_getaffinity(0)), port=port, target=target,
            # splicing needs 2 fds per pipe too: a fixed pool of pipes, fewer connections
            maxconn=max_relayed() - (SPLICE_PIPES if splice else 0),
            pipes=f"    maxpipes {SPLICE_PIPES}" if splice else "",
            # its pollers never sleep (a null timeout), on every thread, idle or not
            busy="    busy-polling" if busy else "",
            splice=SPLICE_OPTIONS[splice]))
        return Started(port, [s.proxy(["haproxy", "-db", "-f", str(cfg)], port, "haproxy")])
    return start


def _socat(s: Session, target: int) -> Started:
    port = s.port()
    # backlog=4096 like the others (socat's default is 5); one process per connection
    argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
            f"TCP:127.0.0.1:{target}"]
    return Started(port, [s.proxy(argv, port, "socat")])


def variant_peer(spec: str) -> Peer:
    """`KEY=ROOT[::ARGS]`: mptcpproxy TCP->TCP from another tree (a lever to measure)."""
    key, _, rest = spec.partition("=")
    root, _, args = rest.partition("::")
    env = {**PROXY_ENV, "PYTHONPATH": str(Path(root or ROOT).resolve())}

    def start(s: Session, target: int) -> Started:
        port = s.port()
        argv = [*PROXY, "-m", "client", "-p", str(port), "-r",
                f"127.0.0.1:{target}", "-q", "--drain-timeout", "1", "--disable-mptcp",
                *args.split()]
        return Started(port, [s.proxy(argv, port, key, env)])
    return Peer(key, start)


@dataclass(frozen=True)
class Peer:
    key: str
    start: Callable[[Session, int], Started] | None  # None: no proxy
    needs: str | None = None  # a program that must be installed
    max_hold: int = 1 << 30  # the most idle connections it is asked to hold
    groups: tuple[str, ...] = ()  # the only measurement groups it takes part in; (): all
    spins: bool = False  # busy even when idle: stopped as soon as it was measured


PEERS = [
    Peer("direct", None),
    Peer("tcp", _mptcpproxy(PROXY, PROXY_ENV)),
    # the set-ups a user picks for bulk (less CPU per byte) and for latency
    Peer("tcp-splice", _mptcpproxy(PROXY, PROXY_ENV, "--splice"), groups=("tput",)),
    Peer("tcp-busy", _mptcpproxy(PROXY, PROXY_ENV, f"--busy-poll={BUSY_POLL_US}"),
         groups=("echo",)),
    Peer("pair", _pair),
    Peer("py", _mptcpproxy(TWIN, TWIN_ENV)),
    Peer("haproxy", _haproxy(""), "haproxy"),
    Peer("haproxy-busy", _haproxy("", busy=True), "haproxy", groups=("echo",), spins=True),
    # their pipes take fds that 10,000 connections need; idle, they are the same as HAProxy
    Peer("haproxy-splice", _haproxy("auto"), "haproxy", max_hold=1000),
    Peer("haproxy-splice-forced", _haproxy("forced"), "haproxy", max_hold=1000),
    # a process per connection: 10,000 of them would be 10,000 forks
    Peer("socat", _socat, "socat", max_hold=1000),
]


# -- measurements ---------------------------------------------------------------------------

class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")

    def emit(self, **record: object) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def sample(self, metric: str, peer: str, run: int, value: float | None, **extra) -> None:
        if value is None:
            return
        self.emit(type="sample", metric=metric, peer=peer, run=run, value=value, **extra)
        log(f"  {peer:15} {metric:22} {report.fmt(metric, value)}")

    def close(self) -> None:
        self.file.close()


def _json_line(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON in output: {text[-500:]!r}")
    return json.loads(lines[-1])


def loadgen(s: Session, *args: object, timeout: float, cpu: str | None = None) -> dict:
    argv = [s.loadgen, *map(str, args)]
    res = s.host.run(["taskset", "-c", cpu, *argv] if cpu else argv, timeout=timeout,
                     check=False)
    if res.returncode != 0:
        raise BenchError(f"loadgen {args[0]} failed: {res.stderr.strip()}")
    return _json_line(res.stdout)


def iperf(host: Host, addr: str, port: int, seconds: int, *extra: str,
          wrap: tuple[str, ...] = ()) -> dict:
    """The iperf3 -J report; retried once when the server is still busy with the last test."""
    argv = [*wrap, "iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J", *extra]
    for attempt in range(2):
        res = host.run(argv, timeout=seconds + 60, check=False)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            data = {"error": res.stderr.strip() or res.stdout[-300:]}
        if "error" not in data:
            return data
        if attempt == 0 and "busy" in data["error"]:
            time.sleep(1)
            continue
        raise BenchError(f"iperf3 {' '.join(extra)}: {data['error']}")
    raise AssertionError("unreachable")


def measure_tput(s: Session, peer: Peer, st: Started, rec: Recorder, run: int,
                 streams: int) -> None:
    extra = ["-P", str(streams)] if streams > 1 else []
    cpu0 = cpu_seconds(st.pids)
    data = iperf(s.host, "127.0.0.1", st.port, s.plan.iperf_seconds, *extra)
    time.sleep(0.2)  # the proxy finishes its last bytes and closes
    cpu = cpu_seconds(st.pids) - cpu0
    received = data["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    rec.sample("tput1_gbps" if streams == 1 else "tput8_gbps", peer.key, run,
               received["bits_per_second"] / 1e9, bytes=received["bytes"],
               seconds=received["seconds"], proxy_cpu_s=round(cpu, 3) if st.procs else None)
    if st.procs and gbytes > 0:
        rec.sample("cpu_s_per_gb" if streams == 1 else "cpu8_s_per_gb", peer.key, run,
                   cpu / gbytes, cpu_s=round(cpu, 3), gbytes=round(gbytes, 3))


def measure_pingpong(s: Session, peer: Peer, st: Started, rec: Recorder, run: int) -> None:
    secs = s.plan.pingpong_seconds
    cpu0 = cpu_seconds(st.pids)
    pp = loadgen(s, "pingpong", "127.0.0.1", st.port, secs, 5_000_000, timeout=secs + 30)
    cpu = cpu_seconds(st.pids) - cpu0
    rec.sample("rt_per_s", peer.key, run, pp["rate"], count=pp["count"], errors=pp["errors"])
    if st.procs and pp["count"]:
        rec.sample("rt_cpu_us", peer.key, run, cpu / pp["count"] * 1e6, cpu_s=round(cpu, 3))
    rec.sample("rt_p50_us", peer.key, run, pp["p50_us"])
    rec.sample("rt_p99_us", peer.key, run, pp["p99_us"], max_us=pp["max_us"])


def pin(pids: Iterable[int], cpus: str) -> None:
    """CPU affinity of the processes and all their threads (`taskset -a`)."""
    for pid in process_tree(pids):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True,
                       timeout=10, check=False)


def measure_pingpong_one_cpu(s: Session, peer: Peer, st: Started, rec: Recorder,
                             run: int) -> None:
    """Ping-pong with client, proxy and echo server on one CPU: the round trip is then the
    sum of their CPU costs, without the wake-ups of an idle second (virtual) CPU, which on
    this kind of machine decide the two-CPU figure as much as any proxy does."""
    secs = s.plan.pingpong_seconds
    pids = [*st.pids, s.servers[ECHO_PORT].pid]
    pin(pids, "0")
    try:
        pp = loadgen(s, "pingpong", "127.0.0.1", st.port, secs, 5_000_000, timeout=secs + 30,
                     cpu="0")
    finally:
        pin(pids, f"0-{os.cpu_count() - 1}")
    rec.sample("rt1cpu_per_s", peer.key, run, pp["rate"], count=pp["count"],
               errors=pp["errors"], p50_us=pp["p50_us"], p99_us=pp["p99_us"])


def measure_connrate(s: Session, peer: Peer, st: Started, rec: Recorder, run: int) -> None:
    secs = s.plan.connrate_seconds
    cpu0 = cpu_seconds(st.pids)
    cr = loadgen(s, "connrate", "127.0.0.1", st.port, secs, s.plan.connrate_concurrency,
                 2_000_000, timeout=secs + 30)
    time.sleep(0.1)  # the last connections' closes and reports
    cpu = cpu_seconds(st.pids) - cpu0
    rec.sample("conn_per_s", peer.key, run, cr["rate"], count=cr["count"],
               errors=cr["errors"], stuck=cr["stuck"], concurrency=cr["concurrency"])
    if st.procs and cr["count"]:
        rec.sample("conn_cpu_us", peer.key, run, cpu / cr["count"] * 1e6, cpu_s=round(cpu, 3))
    rec.sample("conn_p50_us", peer.key, run, cr["p50_us"])
    rec.sample("conn_p99_us", peer.key, run, cr["p99_us"], max_us=cr["max_us"])


def measure_burst(s: Session, peer: Peer, st: Started, rec: Recorder, run: int) -> None:
    b = loadgen(s, "burst", "127.0.0.1", st.port, s.plan.burst, 15, timeout=60)
    rec.sample("burst_served", peer.key, run, b["served"], n=b["n"], errors=b["errors"],
               unanswered=b["unanswered"], connect_spread_ms=b["connect_spread_ms"])
    rec.sample("burst_p99_ms", peer.key, run, b["p99_us"] / 1000, p50_ms=b["p50_us"] / 1000,
               max_ms=b["max_us"] / 1000)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"no answer from the load generator within {timeout:g} s")
        return proc.stdout.readline()
    finally:
        sel.close()


def measure_hold(s: Session, peer: Peer, rec: Recorder, run: int, wanted: int) -> None:
    """Memory of the proxy per idle connection: a fresh proxy, warmed up, then n held."""
    n = min(wanted, peer.max_hold, max_relayed())
    st = peer.start(s, ECHO_PORT)
    timeout = 60 + n / 200
    holder: subprocess.Popen | None = None
    try:
        loadgen(s, "burst", "127.0.0.1", st.port, 64, 10, timeout=30)  # warm-up
        time.sleep(0.5)
        rss0, pss0 = memory_kib(st.pids)
        holder = subprocess.Popen(
            s.host.argv([s.loadgen, "hold", "127.0.0.1", str(st.port), str(n), str(timeout)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        held = json.loads(_read_line(holder, timeout + 5))
        time.sleep(0.5)  # hand-offs and log lines settle
        rss1, pss1 = memory_kib(st.pids)
        holder.stdin.write("release\n")
        holder.stdin.flush()
        verify = json.loads(_read_line(holder, 30))
        holder.wait(30)
        count = max(held["held"], 1)
        # socat forks per connection: its RSS sum counts shared pages once per process
        use_pss = peer.key == "socat"
        per_conn = ((pss1 - pss0) if use_pss else (rss1 - rss0)) / count
        tag = f"{wanted // 1000}k"
        rec.sample(f"idle_kib_{tag}", peer.key, run, per_conn, n=n, held=held["held"],
                   rss_before_kib=rss0, rss_after_kib=rss1, pss_before_kib=pss0,
                   pss_after_kib=pss1, measure="pss" if use_pss else "rss")
        rec.sample(f"held_{tag}", peer.key, run, verify["verified"], n=n,
                   open_errors=held["errors"], open_pending=held["pending"],
                   verify_errors=verify["errors"], verify_unanswered=verify["unanswered"],
                   open_seconds=held["open_seconds"])
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(10)
        st.stop()


def run_loopback(peers: list[Peer], plan: Plan, loadgen_bin: str, rec: Recorder) -> None:
    for run in range(plan.runs):
        # rotate the order so that no peer always goes first (or last)
        order = peers[run % len(peers):] + peers[:run % len(peers)]
        log(f"run {run + 1}/{plan.runs} on loopback: {', '.join(p.key for p in order)}")
        with TestBed("bench-lo") as bed:
            loopback_run(Session(bed, loadgen_bin, plan), order, rec, run)


def loopback_run(s: Session, order: list[Peer], rec: Recorder, run: int) -> None:
    """One namespace with every peer started side by side; each metric is taken from all
    peers back to back, so that the figures compared were taken seconds apart."""
    groups = s.plan.groups
    running: dict[tuple[str, int], Started | None] = {}

    def guarded(what: str, peer: Peer, fn: Callable[..., None], *args) -> None:
        try:
            fn(*args)
        except (BenchError, RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"  {peer.key} {what}: FAILED: {exc}")
            rec.emit(type="error", peer=peer.key, run=run, what=what, error=str(exc)[-2000:])

    def start(peer: Peer, target: int) -> None:
        running[peer.key, target] = peer.start(s, target) if peer.start else Started(target)

    steps: list[tuple[str, str, int, Callable[..., None], tuple]] = []
    if "tput" in groups:
        steps += [("tput", "1 stream", IPERF_PORT, measure_tput, (1,)),
                  ("tput", "8 streams", IPERF_PORT, measure_tput, (8,))]
    if "echo" in groups or "echo-pingpong" in groups:
        steps.append(("echo", "ping-pong", ECHO_PORT, measure_pingpong, ()))
    if "echo" in groups and shutil.which("taskset"):
        steps.append(("echo", "ping-pong on one CPU", ECHO_PORT, measure_pingpong_one_cpu, ()))
    if "echo" in groups:
        steps += [("echo", "connection rate", ECHO_PORT, measure_connrate, ()),
                  ("echo", "burst", ECHO_PORT, measure_burst, ())]
    try:
        for group, what, target, fn, extra in steps:
            s.serve(target)
            for peer in order:
                if peer.groups and group not in peer.groups:
                    continue
                if (peer.key, target) not in running:
                    running[peer.key, target] = None
                    guarded("start", peer, start, peer, target)
                st = running[peer.key, target]
                if st is not None:
                    guarded(what, peer, fn, s, peer, st, rec, run, *extra)
                    if peer.spins:  # it would take CPU from the others' measurements
                        st.stop()
                        del running[peer.key, target]
                    time.sleep(0.3)  # closing connections settle between peers
    finally:
        for st in running.values():
            if st is not None:
                st.stop()
    if "hold" in groups:
        s.serve(ECHO_PORT)
        for wanted in s.plan.holds:
            for peer in order:
                if (peer.start is not None and wanted <= peer.max_hold
                        and (not peer.groups or "hold" in peer.groups)):
                    guarded(f"hold {wanted}", peer, measure_hold, s, peer, rec, run, wanted)


# -- two shaped paths -----------------------------------------------------------------------

PATH_NETS = ("10.201.1", "10.201.2")


def two_paths(bed: TestBed, rate: str = "100mbit") -> tuple[Host, Host, list]:
    """Client and server joined by two shaped paths; the server announces the second."""
    cli, srv = bed.host("cli"), bed.host("srv")
    links = [bed.link(cli, srv, f"{net}.1/24", f"{net}.2/24") for net in PATH_NETS]
    for link in links:
        link.shape(rate, "32kb", "20ms")
    srv.mptcp_limits(subflows=1)
    srv.mptcp_endpoint(links[1].ip_b, links[1].dev_b, "signal")
    cli.mptcp_limits(subflows=1, add_addr_accepted=1)
    return cli, srv, links


def start_pair(cli: Host, srv: Host, server_addr: str, target: int) -> list[Proc]:
    common = ["-q", "--drain-timeout", "1"]
    server = srv.start([*PROXY, "-m", "server", "-p", "4444", "-r",
                        f"127.0.0.1:{target}", *common], name="server-proxy", env=PROXY_ENV)
    srv.wait_listening(4444, proc=server)
    client = cli.start([*PROXY, "-m", "client", "-p", "5555", "-r",
                        f"{server_addr}:4444", *common], name="client-proxy", env=PROXY_ENV)
    cli.wait_listening(5555, proc=client)
    return [client, server]


def run_shaped(plan: Plan, rec: Recorder) -> None:
    if not shutil.which("mptcpize"):
        log("shaped paths: mptcpize is missing (apt-get install mptcpd); skipped")
        return
    with TestBed("bench-shaped") as bed:
        cli, srv, links = two_paths(bed)
        server_addr = links[0].ip_b
        plain = srv.start(["iperf3", "-s", "-p", "5201"], name="iperf3-tcp")
        srv.wait_listening(5201, proc=plain)
        mptcp = srv.start(["mptcpize", "run", "iperf3", "-s", "-p", "5202"], name="iperf3-mptcp")
        srv.wait_listening(5202, proc=mptcp)
        start_pair(cli, srv, server_addr, 5201)
        variants = {
            "tcp-1path": (server_addr, 5201, ()),
            "mptcp-direct": (server_addr, 5202, ("mptcpize", "run")),
            "pair": ("127.0.0.1", 5555, ()),
        }
        for run in range(plan.shaped_runs):
            log(f"shaped paths, run {run + 1}/{plan.shaped_runs}")
            for key, (addr, port, wrap) in variants.items():
                try:
                    data = iperf(cli, addr, port, plan.shaped_seconds, wrap=wrap)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    log(f"  {key}: FAILED: {exc}")
                    rec.emit(type="error", peer=key, run=run, error=str(exc)[-2000:])
                    continue
                recv = data["end"]["sum_received"]
                rec.sample("shaped_mbps", key, run, recv["bits_per_second"] / 1e6,
                           bytes=recv["bytes"], seconds=recv["seconds"])


def run_cut(plan: Plan, rec: Recorder) -> None:
    """A checksummed transfer through the proxy pair; the first path is cut at a third."""
    log(f"path cut: {plan.cut_bytes >> 20} MiB through the pair, path 1 cut at a third")
    with TestBed("bench-cut") as bed:
        cli, srv, links = two_paths(bed)
        monitor = cli.monitor()
        receiver = srv.start([PY, XFER, "recv", "5201"], name="recv")
        srv.wait_listening(5201, proc=receiver)
        start_pair(cli, srv, links[0].ip_b, 5201)
        t0 = time.monotonic()
        sender = cli.start([PY, XFER, "send", "127.0.0.1", "5555", str(plan.cut_bytes)],
                           name="send")

        def progress() -> int:
            try:
                return _json_line(receiver.stdout).get("progress", 0)
            except BenchError:
                return 0

        try:
            monitor.wait_for({"SF_ESTABLISHED": 1}, timeout=20)
            wait_until(lambda: progress() >= plan.cut_bytes // 3 or receiver.poll() is not None,
                       60, "a third of the transfer")
            cut_at = progress()
            links[0].down()
            t_cut = time.monotonic()
            receiver.wait(120)
            sender.wait(30)
            sent, got = _json_line(sender.stdout), _json_line(receiver.stdout)
        except (BenchError, AssertionError, TimeoutError, subprocess.TimeoutExpired) as exc:
            log(f"  path cut: FAILED: {exc}")
            rec.emit(type="error", peer="pair", run=0, error=str(exc)[-2000:],
                     procs=bed.describe()[-4000:])
            rec.sample("cut_intact", "pair", 0, 0, reason=str(exc)[-300:])
            return
        intact = (got.get("bytes") == sent.get("bytes") == plan.cut_bytes
                  and got.get("sha256") == sent.get("sha256") and "error" not in got)
        rec.sample("cut_intact", "pair", 0, int(intact), bytes=got.get("bytes"),
                   sha256_sent=sent.get("sha256"), sha256_received=got.get("sha256"),
                   cut_at_bytes=cut_at, seconds=round(time.monotonic() - t0, 2),
                   seconds_after_cut=round(time.monotonic() - t_cut, 2))


# -- set-up, the machine, main ----------------------------------------------------------------

def build_loadgen(out_dir: Path) -> str:
    src = BENCH / "loadgen.c"
    binary = out_dir / ".bin" / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(src)], check=True,
                       timeout=120)
    return str(binary)


def _version(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (res.stdout + res.stderr).strip().splitlines()
    return text[0] if text else "?"


def use_tree(tree: Path) -> None:
    """Measure the mptcpproxy of another checkout (built in place), e.g. a given commit."""
    for env in (PROXY_ENV, TWIN_ENV):
        env["PYTHONPATH"] = str(tree.resolve())


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    tree = PROXY_ENV["PYTHONPATH"]
    git = subprocess.run(["git", "-C", tree, "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10).stdout.strip()
    version = subprocess.run([PY, "-c", BOOT.split("; from")[0] + "; import mptcpproxy; "
                              "print(mptcpproxy.__version__)"], capture_output=True, text=True,
                             timeout=30, env={**os.environ, "PYTHONPATH": tree}).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(), "debian": debian,
        "python": platform.python_version(),
        "mptcpproxy": f"{version} ({git})" if git else version,
        "tree": tree,
        "iperf3": _version(["iperf3", "--version"]),
        "haproxy": _version(["haproxy", "-v"]),
        "socat": next((line for line in _version_lines(["socat", "-V"])
                       if "socat version" in line), "missing"),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def _version_lines(argv: list[str]) -> list[str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (res.stdout + res.stderr).splitlines()


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE (inherited by everything started) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):  # raising the hard limit needs CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def max_relayed() -> int:
    """Connections one relaying process can hold under the fd limit (2 fds each)."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE) // 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                   help="one run, short durations (also BENCH_QUICK=1)")
    p.add_argument("--smoke", action="store_true",
                   help="one metric (ping-pong), one peer (mptcpproxy), about a second")
    p.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    p.add_argument("--peers", help="comma-separated: " + ",".join(pe.key for pe in PEERS))
    p.add_argument("--groups", help="comma-separated: tput,echo,hold,shaped,cut")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=ROOT[::ARGS]",
                   help="also measure mptcpproxy TCP->TCP imported from ROOT (e.g. a patched "
                   "copy of the package) with extra ARGS, as peer KEY; repeatable")
    p.add_argument("--tree", type=Path, default=ROOT,
                   help="the checkout whose mptcpproxy is measured (default: this one)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    p.add_argument("--readme", type=Path, help="markdown file to put the table in "
                   "(default bench/README.md; none with --smoke)")
    p.add_argument("--chart", type=Path, help="PNG chart (default bench/ratios.png; "
                   "none with --smoke)")
    p.add_argument("--no-report", action="store_true", help="only the JSON lines")
    p.add_argument("--report", type=Path, metavar="JSONL",
                   help="measure nothing: table and chart from this results file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    readme = args.readme or (None if args.smoke else BENCH / "README.md")
    chart = args.chart or (None if args.smoke else BENCH / "ratios.png")
    if args.report:
        report.write_all(args.report, None if args.no_report else readme,
                         None if args.no_report else chart)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (it makes network namespaces)", file=sys.stderr)
        return 1
    use_tree(args.tree)
    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan()
    if args.runs:
        plan.runs = plan.shaped_runs = args.runs
    if args.groups:
        plan.groups = tuple(args.groups.split(","))
    if args.peers:
        plan.peers = tuple(args.peers.split(","))
    peers = [pe for pe in PEERS if not plan.peers or pe.key in plan.peers]
    peers += [variant_peer(spec) for spec in args.variant]
    for pe in [pe for pe in peers if pe.needs and not shutil.which(pe.needs)]:
        log(f"{pe.key}: {pe.needs} is not installed; skipped (make bench installs it)")
        peers.remove(pe)

    nofile = raise_nofile()
    binary = build_loadgen(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{'smoke' if args.smoke else 'bench'}-{stamp}.jsonl"
    rec = Recorder(path)
    started = time.monotonic()
    info = machine()
    rec.emit(type="meta", plan=plan.__dict__, peers=[pe.key for pe in peers],
             quick=args.quick, smoke=args.smoke, nofile=nofile, max_relayed=max_relayed(),
             **info)
    log(f"results: {path}")
    try:
        run_loopback(peers, plan, binary, rec)
        if "shaped" in plan.groups:
            run_shaped(plan, rec)
        if "cut" in plan.groups:
            run_cut(plan, rec)
    finally:
        rec.emit(type="end", seconds=round(time.monotonic() - started, 1),
                 loadavg=Path("/proc/loadavg").read_text().split()[:3])
        rec.close()
    log(f"done in {time.monotonic() - started:.0f} s")
    if not args.no_report:
        report.write_all(path, readme, chart)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
