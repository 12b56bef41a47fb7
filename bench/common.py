"""The bench's shared pieces: paths, the proxies' command lines, the plan of a run, and
CPU time and memory of processes from /proc."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# the test bed of the scenario tests (test/netns.py) and this folder's modules, importable
# from every bench module that imports this one first
sys.path.insert(0, str(ROOT / "test"))
sys.path.insert(0, str(BENCH))

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
# makes `import mptcpproxy.relay._relay` fail, so relay.py falls back to _relay_py.
TWIN = [PY, "-c", BOOT.replace("from mptcpproxy", "sys.modules['mptcpproxy.relay._relay'] = None; "
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
    # new connections/s with this many in flight, each its own figure
    connrate_concurrencies: tuple[int, ...] = (8, 16, 64)
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



def max_relayed() -> int:
    """Connections one relaying process can hold under the fd limit (2 fds each)."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE) // 2
