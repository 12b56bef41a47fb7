"""Tables, targets and the ratio chart from a bench results file (JSON lines).

    python bench/report.py bench/results/bench-<stamp>.jsonl   print the markdown

`bench.py` calls `write_all()`: the markdown goes into bench/README.md between the
`<!-- bench:begin -->` and `<!-- bench:end -->` markers, the chart into bench/ratios.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

from figures import BY_KEY, METRICS, PEER_LABELS, TUNED, Results, fmt
from targets import round_two, targets

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

def _in_flight(plan: dict) -> str:
    n = plan.get("connrate_concurrencies") or [plan.get("connrate_concurrency")]
    return ", ".join(map(str, n))


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
        f"({_in_flight(plan)} in flight), shaped iperf3 "
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
    two = round_two(r)
    if any(t.ok is not None for t, _, _ in two):
        lines += ["Round two (issue 16): mptcpproxy with its default command line (an INFO "
                  "line per connection) against the better of HAProxy with and without "
                  "splice-auto; the proxy pair against two HAProxies run under `mptcpize`. "
                  "Not judged, beside it: the same figure with `-q`, and the same figure for "
                  "`bench/barerelay.c`, a C relay that makes only the system calls relaying "
                  "needs (no log line, no accounting, no timeouts): the floor, what a relay "
                  "on the kernel's sockets reaches on this machine. A goal the bare relay "
                  "misses too is above what the machine allows a relay.", "",
                  "| target (round two) | goal | defaults | | with `-q` | the bare C relay |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t.name} | {t.goal} | {t.measured} | {_mark(t.ok)} | {quiet} | {bare} |"
                  for t, quiet, bare in two]
        lines.append("")
    tg, tuned = targets(r), targets(r, *TUNED)
    if any(t.ok is not None for t in tg):
        lines += ["Round one's targets, judged twice. **Defaults**: mptcpproxy TCP→TCP as "
                  "it starts against the better of HAProxy with and without splice-auto. "
                  "**Tuned**: the better of mptcpproxy default, `--splice` and "
                  "`--busy-poll 50` against the better of HAProxy default, splice-auto and "
                  "`busy-polling` (the set-up is named where it is not the default).", "",
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
    for peer, why in r.meta.get("skipped", {}).items():
        lines += [f"Not measured: {PEER_LABELS.get(peer, peer)}: {why}.", ""]
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
