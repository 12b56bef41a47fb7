"""The measurements on loopback: throughput, ping-pong, connections, idle memory; each
peer measured back to back with the others."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from common import (
    ECHO_PORT,
    IPERF_PORT,
    BenchError,
    Plan,
    cpu_seconds,
    log,
    max_relayed,
    memory_kib,
    process_tree,
)
from contenders import Peer, Session, Started
from figures import fmt
from netns import Host, TestBed


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
        log(f"  {peer:15} {metric:22} {fmt(metric, value)}")

    def close(self) -> None:
        self.file.close()


def json_line(text: str) -> dict:
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
    return json_line(res.stdout)


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


def connrate_key(concurrency: int, what: str) -> str:
    """conn_per_s for 8 in flight (the key of earlier results), conn16_per_s for 16..."""
    return f"conn{'' if concurrency == 8 else concurrency}_{what}"


def measure_connrate(s: Session, peer: Peer, st: Started, rec: Recorder, run: int,
                     concurrency: int) -> None:
    secs = s.plan.connrate_seconds
    cpu0 = cpu_seconds(st.pids)
    cr = loadgen(s, "connrate", "127.0.0.1", st.port, secs, concurrency, 2_000_000,
                 timeout=secs + 30)
    time.sleep(0.1)  # the last connections' closes and reports
    cpu = cpu_seconds(st.pids) - cpu0
    rec.sample(connrate_key(concurrency, "per_s"), peer.key, run, cr["rate"],
               count=cr["count"], errors=cr["errors"], stuck=cr["stuck"],
               concurrency=cr["concurrency"])
    if st.procs and cr["count"]:
        rec.sample(connrate_key(concurrency, "cpu_us"), peer.key, run,
                   cpu / cr["count"] * 1e6, cpu_s=round(cpu, 3))
    rec.sample(connrate_key(concurrency, "p50_us"), peer.key, run, cr["p50_us"])
    rec.sample(connrate_key(concurrency, "p99_us"), peer.key, run, cr["p99_us"],
               max_us=cr["max_us"])


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
        steps += [("echo", f"connection rate, {n} in flight", ECHO_PORT, measure_connrate, (n,))
                  for n in s.plan.connrate_concurrencies]
        steps.append(("echo", "burst", ECHO_PORT, measure_burst, ()))
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
