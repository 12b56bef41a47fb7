"""Tables, targets and the ratio chart from a bench results file (JSON lines).

    python bench/report.py bench/results/bench-<stamp>.jsonl   print the markdown

`bench.py` calls `write_all()`: the markdown goes into bench/README.md between the
`<!-- bench:begin -->` and `<!-- bench:end -->` markers, the chart into bench/ratios.png.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

PEER_LABELS = {
    "direct": "no proxy",
    "tcp": "mptcpproxy TCP→TCP",
    "tcp-splice": "mptcpproxy --splice",
    "tcp-busy": "mptcpproxy --busy-poll 50",
    "pair": "mptcpproxy pair TCP→MPTCP→TCP",
    "py": "pure-Python twin TCP→TCP",
    "haproxy": "HAProxy",
    "haproxy-splice": "HAProxy splice-auto",
    "haproxy-splice-forced": "HAProxy splice forced",
    "haproxy-busy": "HAProxy busy-polling",
    "socat": "socat",
    "tcp-1path": "one TCP path",
    "mptcp-direct": "MPTCP sockets (mptcpize)",
}
# Each target is judged twice: default set-ups (mptcpproxy TCP->TCP against the better
# of HAProxy with and without splice-auto, as the issue sets it up), and the better of
# each side's tuned set-ups (mptcpproxy --splice / --busy-poll, HAProxy busy-polling).
# "haproxy-splice-forced" is shown beside them, not judged against.
DEFAULTS = (("tcp",), ("haproxy", "haproxy-splice"))
TUNED = (("tcp", "tcp-splice", "tcp-busy"), ("haproxy", "haproxy-splice", "haproxy-busy"))


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    fmt: str
    higher_is_better: bool


METRICS = [
    Metric("tput1_gbps", "throughput, 1 stream", "Gbit/s", "{:.2f}", True),
    Metric("tput8_gbps", "throughput, 8 streams", "Gbit/s", "{:.2f}", True),
    Metric("cpu_s_per_gb", "proxy CPU per GB relayed, 1 stream", "s", "{:.3f}", False),
    Metric("cpu8_s_per_gb", "proxy CPU per GB relayed, 8 streams", "s", "{:.3f}", False),
    Metric("rt_per_s", "ping-pong round trips/s", "1/s", "{:,.0f}", True),
    Metric("rt_p50_us", "ping-pong latency p50", "µs", "{:.1f}", False),
    Metric("rt_p99_us", "ping-pong latency p99", "µs", "{:.1f}", False),
    Metric("rt_cpu_us", "proxy CPU per round trip", "µs", "{:.1f}", False),
    Metric("rt1cpu_per_s", "ping-pong, all on one CPU: round trips/s", "1/s", "{:,.0f}", True),
    Metric("conn_per_s", "new connections/s (8 in flight)", "1/s", "{:,.0f}", True),
    Metric("conn_p50_us", "connection set-up p50", "µs", "{:.0f}", False),
    Metric("conn_p99_us", "connection set-up p99", "µs", "{:.0f}", False),
    Metric("conn_cpu_us", "proxy CPU per connection", "µs", "{:.0f}", False),
    Metric("burst_served", "1000 simultaneous connects: served", "", "{:.0f}", True),
    Metric("burst_p99_ms", "1000 simultaneous connects: set-up p99", "ms", "{:.1f}", False),
    Metric("idle_kib_1k", "memory per idle connection, 1000 held", "KiB", "{:.2f}", False),
    Metric("idle_kib_10k", "memory per idle connection, 10,000 held", "KiB", "{:.2f}", False),
    Metric("held_1k", "1000 held: still echoing at the end", "", "{:,.0f}", True),
    Metric("held_10k", "10,000 held: still echoing at the end", "", "{:,.0f}", True),
    Metric("shaped_mbps", "two 100 Mbit/s paths", "Mbit/s", "{:.1f}", True),
    Metric("cut_intact", "path cut mid-transfer: all bytes, same sha256", "", "{:.0f}", True),
]
BY_KEY = {m.key: m for m in METRICS}


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    m = BY_KEY.get(metric)
    return m.fmt.format(value) if m else f"{value:g}"


# -- loading and medians ------------------------------------------------------------------

class Results:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict = {}
        self.end: dict = {}
        self.errors: list[dict] = []
        self.samples: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            kind = rec.get("type")
            if kind == "meta":
                self.meta = rec
            elif kind == "end":
                self.end = rec
            elif kind == "error":
                self.errors.append(rec)
            elif kind == "sample":
                self.samples[rec["metric"], rec["peer"]].append(rec)

    def median(self, metric: str, peer: str) -> float | None:
        values = [s["value"] for s in self.samples.get((metric, peer), ())]
        return statistics.median(values) if values else None

    def count(self, metric: str, peer: str) -> int:
        return len(self.samples.get((metric, peer), ()))

    def medians(self) -> dict[tuple[str, str], float]:
        return {key: self.median(*key) for key in self.samples}

    def peers(self) -> list[str]:
        seen = {peer for _, peer in self.samples}
        order = self.meta.get("peers") or list(PEER_LABELS)
        return [p for p in order if p in seen]

    def best(self, metric: str, peers: tuple[str, ...]) -> tuple[float | None, str | None]:
        """The best of these peers' figures for this metric, and whose it is."""
        best, which = None, None
        higher = BY_KEY[metric].higher_is_better
        for peer in peers:
            v = self.median(metric, peer)
            if v is not None and (best is None or (v > best if higher else v < best)):
                best, which = v, peer
        return best, which


# -- targets --------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(ratio: float, goal: float) -> str:
    """'1.23×', with a third decimal where two would round onto the goal."""
    text = f"{ratio:.2f}"
    return (f"{ratio:.3f}" if float(text) == goal and ratio != goal else text) + "×"


def targets(r: Results, ours: tuple[str, ...] = DEFAULTS[0],
            theirs: tuple[str, ...] = DEFAULTS[1]) -> list[Target]:
    """The issue's targets, each figure the best of `ours` (named when it is not the
    default set-up) against the best of `theirs`."""
    out: list[Target] = []

    def named(peer: str | None) -> str:
        return "" if peer in (None, "tcp") else f" {PEER_LABELS[peer]}"

    def mine(metric: str) -> tuple[float | None, str]:
        value, peer = r.best(metric, ours)
        return value, named(peer)

    def vs_haproxy(metric: str, goal: float, name: str, inverse: bool = False) -> None:
        ref, which = r.best(metric, theirs)
        value, who = mine(metric)
        ratio = _ratio(ref, value) if inverse else _ratio(value, ref)
        measured = "–" if ratio is None else (
            f"{_times(ratio, goal)} ({fmt(metric, value)}{who} vs {fmt(metric, ref)} "
            f"{PEER_LABELS[which]})")
        out.append(Target(name, f"≥ {goal:g}×", measured,
                          None if ratio is None else ratio >= goal))

    vs_haproxy("tput1_gbps", 2.0, "1-stream throughput vs HAProxy")
    (value, who), limit = mine("tput1_gbps"), r.median("tput1_gbps", "direct")
    ratio = _ratio(value, limit)
    out.append(Target("1-stream throughput vs no proxy", "≥ 0.7×",
                      "–" if ratio is None else
                      f"{_times(ratio, 0.7)} ({value:.2f}{who} vs {limit:.2f} Gbit/s)",
                      None if ratio is None else ratio >= 0.7))
    vs_haproxy("tput8_gbps", 1.3, "8-stream throughput vs HAProxy")
    vs_haproxy("rt_per_s", 1.4, "ping-pong round trips/s vs HAProxy")
    vs_haproxy("rt_p99_us", 1.0, "ping-pong p99 no worse than HAProxy (HAProxy p99 / ours)",
               inverse=True)
    vs_haproxy("conn_per_s", 1.0, "new connections/s vs HAProxy")
    p99, peer = r.best("burst_p99_ms", ours)
    served = r.median("burst_served", peer) if peer else None
    out.append(Target("1000 simultaneous connects: all served, p99 set-up", "1000, ≤ 100 ms",
                      "–" if served is None else f"{served:.0f}, {p99:.1f} ms{named(peer)}",
                      None if served is None else served >= 1000 and p99 <= 100))
    me = "tcp"  # only the default set-up is asked to hold connections
    idle = [v for v in (r.median("idle_kib_1k", me), r.median("idle_kib_10k", me))
            if v is not None]
    out.append(Target("memory per idle connection (worst of 1000 / 10,000 held)", "≤ 3 KiB",
                      "–" if not idle else f"{max(idle):.2f} KiB",
                      None if not idle else max(idle) <= 3.0))
    held = r.median("held_10k", me)
    samples = r.samples.get(("held_10k", me), ())
    errs = sum(s.get("open_errors", 0) + s.get("verify_errors", 0)
               + s.get("verify_unanswered", 0) for s in samples)
    n = min((s.get("n", 10_000) for s in samples), default=10_000)
    measured = "–" if held is None else f"{held:,.0f} of {n:,}, {errs} errors"
    if n < 10_000:
        measured += f" (RLIMIT_NOFILE {r.meta.get('nofile')} allows {n:,} relayed)"
    out.append(Target("10,000 concurrent connections held, no error", "10,000, 0 errors",
                      measured, None if held is None else held >= n and not errs))
    cpu, who = mine("cpu_s_per_gb")
    out.append(Target("proxy CPU per GB relayed (1 stream)", "≤ 0.35 s",
                      "–" if cpu is None else f"{cpu:.3f} s{who}",
                      None if cpu is None else cpu <= 0.35))
    pair, direct = r.median("shaped_mbps", "pair"), r.median("shaped_mbps", "mptcp-direct")
    ratio = _ratio(pair, direct)
    out.append(Target("two shaped paths: proxy pair vs MPTCP sockets", "≥ 0.97×",
                      "–" if ratio is None else
                      f"{_times(ratio, 0.97)} ({pair:.1f} vs {direct:.1f} Mbit/s)",
                      None if ratio is None else ratio >= 0.97))
    cut = r.median("cut_intact", "pair")
    out.append(Target("path cut mid-transfer: nothing lost (sha256)", "intact",
                      "–" if cut is None else ("intact" if cut else "LOST/CORRUPT"),
                      None if cut is None else bool(cut)))
    return out


# -- markdown -------------------------------------------------------------------------------

def _mark(ok: bool | None) -> str:
    return "–" if ok is None else "reached" if ok else "**missed**"


def _cell(r: Results, metric: str, peer: str, runs: int) -> str:
    v = r.median(metric, peer)
    if v is None:
        return "–"
    text = fmt(metric, v)
    n = r.count(metric, peer)
    if n < runs:
        text += f" ({n}/{runs})"
    samples = r.samples.get((metric, peer), ())
    if metric.startswith("idle_kib") and any(s.get("measure") == "pss" for s in samples):
        text += " ᵖ"
    return text


def markdown(r: Results) -> str:
    m = r.meta
    plan = m.get("plan", {})
    runs = plan.get("runs", 1)
    peers = r.peers()
    loop_peers = [p for p in peers if p not in ("tcp-1path", "mptcp-direct")
                  and any(r.median(k, p) is not None for k in BY_KEY
                          if k not in ("shaped_mbps", "cut_intact"))]
    lines = []
    mode = "smoke" if m.get("smoke") else "quick (BENCH_QUICK=1)" if m.get("quick") else "full"
    lines += [
        f"Measured {m.get('date', '?')}, {mode} run: each figure the median of {runs} "
        f"run(s); `{r.path.name}`, {r.end.get('seconds', '?')} s in all.",
        "",
        f"- machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('mem_gib', '?')} GiB; Debian {m.get('debian', '?')}, "
        f"kernel {m.get('kernel', '?')}; load average {' '.join(m.get('loadavg', []))} "
        f"at the start, {' '.join(r.end.get('loadavg', []))} at the end "
        "(the machine is shared: figures are noisy, ratios within one run are what counts)",
        f"- mptcpproxy {m.get('mptcpproxy', '?')}, Python {m.get('python', '?')}; "
        f"{m.get('iperf3', '?')}; {m.get('haproxy', '?')}; {m.get('socat', '?')}",
        f"- durations: iperf3 {plan.get('iperf_seconds')} s, ping-pong "
        f"{plan.get('pingpong_seconds')} s, connection rate {plan.get('connrate_seconds')} s "
        f"({plan.get('connrate_concurrency')} in flight), shaped iperf3 "
        f"{plan.get('shaped_seconds')} s",
        "",
    ]
    if loop_peers:
        lines += ["| loopback, one namespace | " + " | ".join(PEER_LABELS.get(p, p)
                                                           for p in loop_peers) + " |",
                  "|---|" + "---:|" * len(loop_peers)]
        for metric in METRICS:
            if metric.key in ("shaped_mbps", "cut_intact"):
                continue
            if all(r.median(metric.key, p) is None for p in loop_peers):
                continue
            unit = f" ({metric.unit})" if metric.unit else ""
            cells = [_cell(r, metric.key, p, runs) for p in loop_peers]
            lines.append(f"| {metric.label}{unit} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "CPU is utime+stime of the proxy process(es) around the iperf3 run (the pair: "
            "both proxies). Memory per idle connection is the growth of VmRSS (ᵖ: of Pss "
            "summed over the process tree, for socat's process per connection) from a "
            "warmed-up proxy to the same proxy holding the connections, divided by their "
            "number; the pair counts both proxies. Connections and round trips come from "
            "`bench/loadgen.c` (C, epoll), connections/s closes each connection after its "
            "echo. socat is not asked to hold 10,000 (a process each). (k/n): only k of n "
            "runs gave a figure.",
            *([f"RLIMIT_NOFILE here is {m.get('nofile')} and cannot be raised (no "
               "CAP_SYS_RESOURCE): a relaying process holds 2 fds per connection, so the "
               f"'10,000 held' rows hold {m.get('max_relayed'):,}."]
              if m.get("max_relayed", 10_000) < 10_000 else []),
            "",
        ]
    shaped = [p for p in ("tcp-1path", "mptcp-direct", "pair")
              if r.median("shaped_mbps", p) is not None]
    if shaped:
        lines += ["| two namespaces, two paths of 100 Mbit/s (tbf on both veth ends) | "
                  "Mbit/s |", "|---|---:|"]
        for p in shaped:
            label = PEER_LABELS[p] if p != "pair" else "mptcpproxy pair (TCP→MPTCP→TCP)"
            lines.append(f"| {label} | {_cell(r, 'shaped_mbps', p, plan.get('shaped_runs', 1))} |")
        lines.append("")
    cut = r.samples.get(("cut_intact", "pair"))
    if cut:
        c = cut[-1]
        lines += [f"Path cut: {c.get('bytes', 0) / 2**20:.0f} MiB through the pair over both "
                  f"paths, path 1 taken down after {(c.get('cut_at_bytes') or 0) / 2**20:.0f} MiB: "
                  + ("all bytes arrived, same sha256" if c["value"] else
                     f"NOT intact ({c.get('reason', 'bytes or sha256 differ')})")
                  + (f", {c['seconds']} s in all, {c['seconds_after_cut']} s after the cut."
                     if "seconds" in c else "."), ""]
    tg, tuned = targets(r), targets(r, *TUNED)
    if any(t.ok is not None for t in tg):
        lines += ["Targets, judged twice. **Defaults**: mptcpproxy TCP→TCP as it starts "
                  "against the better of HAProxy with and without splice-auto. **Tuned**: the "
                  "better of mptcpproxy default, `--splice` and `--busy-poll 50` against the "
                  "better of HAProxy default, splice-auto and `busy-polling` (the set-up is "
                  "named where it is not the default).", "",
                  "| target | goal | defaults | | tuned | |", "|---|---|---|---|---|---|"]
        for t, u in zip(tg, tuned, strict=True):
            lines.append(f"| {t.name} | {t.goal} | {t.measured} | {_mark(t.ok)} | "
                         f"{u.measured} | {_mark(u.ok)} |")
        lines.append("")
        forced = [(k, r.median(k, "haproxy-splice-forced"), r.median(k, "tcp"))
                  for k in ("tput1_gbps", "tput8_gbps", "cpu_s_per_gb")]
        if all(f is not None and m is not None for _, f, m in forced):
            lines += ["Beside the targets: HAProxy with splicing forced (`option splice-request`, "
                      "`option splice-response`), which splice-auto does not do on loopback: "
                      + ", ".join(f"{BY_KEY[k].label} {fmt(k, f)} {BY_KEY[k].unit} "
                                  f"(mptcpproxy {fmt(k, m)})" for k, f, m in forced) + ".", ""]
    if r.errors:
        lines += ["Failures in this run:", ""]
        lines += [f"- {e.get('peer')} run {e.get('run')}: {e.get('error', '')[:200]}"
                  for e in r.errors]
        lines.append("")
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    old = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = f"{head}{BEGIN}\n{text}\n{END}{tail}"
    else:
        new = f"{old.rstrip()}\n\n{BEGIN}\n{text}\n{END}\n"
    readme.write_text(new)


def write_all(path: Path, readme: Path | None, png: Path | None) -> Results:
    r = Results(path)
    text = markdown(r)
    if readme is not None:
        write_readme(readme, text)
    if png is not None:
        import chart  # it imports this module's tables

        chart.chart(r, png)
    print(text)
    return r


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} RESULTS.jsonl")
    print(markdown(Results(Path(sys.argv[1]))))
