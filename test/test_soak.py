"""The soak: mixed traffic through two client+server proxy pairs for SOAK_SECONDS (30 in the
suite, 600 with `make soak`), under AddressSanitizer when run by `make test-asan`/`make soak`.

The pairs run as real processes in the `simple` scenario (two paths, a `signal` endpoint:
two subflows a connection): one with --splice and --log-file, one copying and logging to
stderr, both with --idle-timeout. Rounds of sessions from soak.py (bulk, ping-pong,
half-close both ways, resets from either end, receivers that stall and resume, receivers
that stall past the idle timeout), every byte sha256-checked, while the test sends SIGHUP to
every proxy every few seconds and takes one path down and up again. Between rounds, when no
connection is open, each proxy's fds and RSS are read: its fds are back to those after the
first round (pipes: within the engine's pool), at the end its RSS is within a bound, one last
transfer through each pair works, each proxy stops with exit code 0, and AddressSanitizer
reported nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Host, Proc, TestBed, wait_until
from test_scenarios import (
    CLIENT_PORT,
    SERVER_PORT,
    SERVICE_PORT,
    Topo,
    _last_json,
    simple,
    start_proxy,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))
SOAK = str(Path(__file__).with_name("soak.py"))
ROUND = 10.0  # seconds of new sessions between two quiet points
IDLE_TIMEOUT = 3  # soak.py's stalls that resume are shorter (1.5 s); its idle ones longer
HUP_EVERY, FLAP_EVERY, FLAP_DOWN = 3.0, 7.0, 1.0
QUIET_TIMEOUT = 30.0  # for the proxies to close what the last round left
WORKERS = 2
# A worker keeps up to POOL_KEEP (8, _relay.pxd) empty pipes for the next spliced transfer:
# that many more pipe fds than at start are not a leak.
PIPE_POOL = 2 * 8 * WORKERS
# An RSS that grew more than this from the first quiet point to the end is a leak: one
# buffer (--buffer-size, 512 KiB) a connection would pass it within a round. The workers
# keep up to 8 spare buffers each; the rest is allocator slack. Under AddressSanitizer the
# allocator also holds freed blocks in a quarantine before reusing them: the soak's
# processes get a small one (ASAN_QUARANTINE_MB), which counts on top.
RSS_SLACK = 32 << 20
ASAN_QUARANTINE_MB = 64

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(2 * SOAK_SECONDS + 600)]


def asan() -> bool:
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def asan_report(pid: int) -> str:
    """The AddressSanitizer report of process `pid`, if ASAN_OPTIONS has a log_path."""
    opts = dict(kv.split("=", 1) for kv in os.environ.get("ASAN_OPTIONS", "").split(":")
                if "=" in kv)
    try:
        return Path(f"{opts['log_path']}.{pid}").read_text(errors="replace")
    except (KeyError, OSError):
        return ""


def fd_kinds(pid: int) -> Counter[str]:
    """The open fds of `pid` by kind: ``pipe``, ``socket``, ``anon_inode:[eventpoll]``, a path."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        kinds[re.sub(r"^(\w+):\[\d+\]$", r"\1", target)] += 1
    return kinds


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def mptcp_counter(host: Host, name: str) -> int:
    """An MPTcpExt counter of the host's namespace (``/proc/net/netstat``)."""
    rows = [line.split() for line in host.run(["cat", "/proc/net/netstat"]).stdout.splitlines()
            if line.startswith("MPTcpExt:")]
    return int(dict(zip(rows[0], rows[1], strict=True)).get(name, 0)) if len(rows) == 2 else 0


class Proxy:
    """One proxy process of a pair, with its fds and RSS at each quiet point."""

    def __init__(self, pair: str, mode: str, proc: Proc) -> None:
        self.name, self.proc = f"the {mode} proxy of pair {pair}", proc
        self.at_start = fd_kinds(proc.pid)
        self.baseline: Counter[str] | None = None  # fds after the first round
        self.fds: list[int] = []
        self.rss: list[int] = []

    def fds_back(self) -> bool:
        """Whether its fds are no more than after the first round (pipes: in the pool)."""
        now = fd_kinds(self.proc.pid)
        return (now["pipe"] <= self.at_start["pipe"] + PIPE_POOL
                and all(n <= self.baseline[kind] for kind, n in now.items() if kind != "pipe"))

    def sample(self) -> str | None:
        """Read fds and RSS at a quiet point; what is wrong, if anything."""
        problem = None
        if self.baseline is None:
            self.baseline = fd_kinds(self.proc.pid)
        else:
            try:
                wait_until(self.fds_back, QUIET_TIMEOUT, "the last round's fds to be closed")
            except TimeoutError:
                problem = (f"{self.name} holds fds {dict(fd_kinds(self.proc.pid))}, "
                           f"{dict(self.baseline)} after the first round")
        self.fds.append(sum(fd_kinds(self.proc.pid).values()))
        self.rss.append(rss(self.proc.pid))
        return problem

    def rss_problem(self) -> str | None:
        bound = RSS_SLACK + (ASAN_QUARANTINE_MB << 20 if asan() else 0)
        if self.rss[-1] > self.rss[0] + bound:
            return (f"the RSS of {self.name} grew from {self.rss[0] >> 20} to "
                    f"{self.rss[-1] >> 20} MiB (more than {bound >> 20} MiB)")
        return None


@dataclass
class Pair:
    label: str
    port: int  # the client proxy's, in the client host
    proxies: list[Proxy]
    dead: bool = False


def start_pair(topo: Topo, i: int, label: str, extra: list[str], log_dir: str) -> Pair:
    def args(mode: str) -> list[str]:
        common = ["--workers", str(WORKERS), "--idle-timeout", str(IDLE_TIMEOUT), *extra]
        return common + (["--log-file", f"{log_dir}/{label}-{mode}.log"] if label == "splice"
                         else [])

    server = start_proxy(topo.srv, "server", SERVER_PORT + i, f"localhost:{SERVICE_PORT}",
                         *args("server"))
    client = start_proxy(topo.cli, "client", CLIENT_PORT + i,
                         f"{topo.server_addr}:{SERVER_PORT + i}", *args("client"))
    proxies = [Proxy(label, "client", client), Proxy(label, "server", server)]
    if so := os.environ.get("MPTCPPROXY_RELAY_SO"):  # the engine under test is the one running
        for p in proxies:
            assert so in Path(f"/proc/{p.proc.pid}/maps").read_text(), f"{p.name}: not {so}"
    return Pair(label, CLIENT_PORT + i, proxies)


class Soak:
    def __init__(self, bed: TestBed, topo: Topo, service: Proc, pairs: list[Pair]) -> None:
        self.bed, self.topo, self.service, self.pairs = bed, topo, service, pairs
        self.failures: list[str] = []
        self.sessions: Counter[str] = Counter()
        self.received = self.hups = self.flaps = 0
        self.awaited: set[str] = set()  # sessions the service has yet to report
        self.service_lines = 0

    def live(self) -> list[Pair]:
        return [p for p in self.pairs if not p.dead]

    def check_alive(self) -> None:
        for pair in self.live():
            for p in pair.proxies:
                if (rc := p.proc.poll()) is not None:
                    pair.dead = True
                    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {rc}"
                    tail = "\n".join(p.proc.stderr.splitlines()[-5:])
                    self.failures.append(f"{p.name} {how} (the soak had sent it {self.hups} "
                                         f"SIGHUPs); the end of its stderr:\n{tail}\n"
                                         f"{asan_report(p.proc.pid)}")

    def disrupt(self, driver: Proc, seconds: float) -> None:
        """SIGHUP every proxy and take a path down and up, until `driver` is done."""
        start = time.monotonic()
        next_hup, next_flap = start + HUP_EVERY, start + FLAP_EVERY
        while driver.poll() is None:
            now = time.monotonic()
            if now > start + seconds + 400:  # its sessions end by their own timeouts first
                self.failures.append(f"the driver did not finish\n{driver.describe()}")
                driver.stop()
                return
            if now >= next_hup:
                for pair in self.live():
                    for p in pair.proxies:
                        p.proc.send_signal(signal.SIGHUP)
                self.hups, next_hup = self.hups + 1, now + HUP_EVERY
            if now >= next_flap and now < start + seconds:
                # the second path: with the first one down, a new connection's first
                # subflow has no route and its connect fails at once (test_failover cuts
                # the first path under a running transfer)
                self.topo.paths[1].down()
                time.sleep(FLAP_DOWN)
                self.topo.paths[1].up()
                self.flaps, next_flap = self.flaps + 1, time.monotonic() + FLAP_EVERY
            self.check_alive()
            time.sleep(0.1)

    def round(self, label: str, seconds: float, once: bool = False) -> None:
        live = self.live()
        if not live:
            return
        argv = [sys.executable, SOAK, "drive", "--ports", ",".join(str(p.port) for p in live),
                "--seconds", f"{seconds:g}", "--label", label,
                "--idle-timeout", str(IDLE_TIMEOUT), *(["--once"] if once else [])]
        driver = self.topo.cli.start(argv, name=f"drive-{label}")
        if once:
            driver.wait(400)
        else:
            self.disrupt(driver, seconds)
        self.check_alive()
        res = _last_json(driver)
        if not res:
            self.failures.append(f"round {label}: the driver printed no result\n"
                                 f"{driver.describe()}")
            return
        self.sessions.update(res["sessions"])
        self.received += res["received"]
        self.failures += [f"round {label}: {f}" for f in res["failed"]]
        self.awaited |= set(res["ok_ids"])
        print(f"soak round {label}: {sum(res['sessions'].values())} sessions "
              f"{dict(res['sessions'])}, {res['received'] >> 20} MiB received, "
              f"{len(res['failed'])} failed", flush=True)

    def check_service(self) -> None:
        """The service's view of every session: what it expected (see soak.py)."""
        def read() -> bool:
            lines = self.service.stdout.splitlines()
            for line in lines[self.service_lines:]:
                rec = json.loads(line)
                self.awaited.discard(rec["id"])
                if rec.get("outcome") != rec.get("expect", "ok"):
                    self.failures.append(f"service: {rec}")
            self.service_lines = len(lines)
            return not self.awaited

        try:
            wait_until(read, QUIET_TIMEOUT, "the service's records of every session")
        except TimeoutError as exc:
            self.failures.append(f"{exc}: none for {sorted(self.awaited)[:10]}")
            self.awaited.clear()

    def sample(self) -> None:
        """At a quiet point: each proxy's fds (back to the first round's) and RSS."""
        self.check_alive()
        self.failures += filter(None, (p.sample() for pair in self.live() for p in pair.proxies))

    def finish(self) -> None:
        """The end: RSS flat, extra subflows seen, a clean stop, no ASan report."""
        for pair in self.live():
            for p in pair.proxies:
                print(f"soak: {p.name}: fds {p.fds}, RSS MiB {[n >> 20 for n in p.rss]}",
                      flush=True)
                if problem := p.rss_problem():
                    self.failures.append(problem)
        joins = mptcp_counter(self.topo.srv, "MPJoinAckRx")
        print(f"soak: {sum(self.sessions.values())} sessions {dict(self.sessions)}, "
              f"{self.received >> 20} MiB received, {joins} extra subflows, "
              f"{self.hups} rounds of SIGHUP, {self.flaps} path flaps", flush=True)
        if not joins:
            self.failures.append("no connection got a second subflow (MPJoinAckRx is 0)")
        for pair in self.live():
            for p in pair.proxies:  # a clean stop is exit code 0
                if (rc := p.proc.stop(timeout=60)) != 0:
                    self.failures.append(f"{p.name} stopped with {rc}\n{p.proc.describe()}")
        for pair in self.pairs:
            for p in pair.proxies:
                if report := asan_report(p.proc.pid):
                    self.failures.append(f"AddressSanitizer, {p.name}:\n{report}")

    def report(self) -> str:
        """The failures, with those of sessions through a pair whose proxy died counted."""
        dead = {f"via port {p.port}:": p.label for p in self.pairs if p.dead}
        lines, lost = [], Counter()
        for f in self.failures:
            where = next((label for port, label in dead.items() if port in f), None)
            if where and f.startswith("round "):
                lost[where] += 1
                if lost[where] > 3:
                    continue
            lines.append(f)
        lines += [f"... {n} sessions through pair {label} failed in all (its proxy died)"
                  for label, n in lost.items()]
        return f"{len(self.failures)} failures in the soak:\n" + "\n".join(lines[:60])


PAIRS = [("splice", ["--splice"]), ("copy", ["--no-splice"])]


def test_soak(testbed: TestBed, monkeypatch: pytest.MonkeyPatch) -> None:
    if asan():  # for the processes started from here on (see RSS_SLACK)
        monkeypatch.setenv("ASAN_OPTIONS", f"{os.environ['ASAN_OPTIONS']}"
                                           f":quarantine_size_mb={ASAN_QUARANTINE_MB}")
    topo = simple(testbed)
    service = topo.srv.start([sys.executable, SOAK, "serve", str(SERVICE_PORT)], name="service")
    topo.srv.wait_listening(SERVICE_PORT, proc=service)
    pairs = [start_pair(topo, i, label, extra, testbed.log_dir)
             for i, (label, extra) in enumerate(PAIRS)]
    soak = Soak(testbed, topo, service, pairs)
    deadline, n = time.monotonic() + SOAK_SECONDS, 0
    while n == 0 or (time.monotonic() < deadline - 1 and soak.live()):
        soak.round(f"r{n}", min(ROUND, max(deadline - time.monotonic(), 1)))
        soak.check_service()
        soak.sample()  # the first round warms up: what follows must not grow
        n += 1
    soak.round("final", 0, once=True)  # the proxies still serve
    soak.check_service()
    soak.sample()
    soak.finish()
    if soak.failures:
        pytest.fail(soak.report(), pytrace=False)
