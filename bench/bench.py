"""`make bench`: mptcpproxy side by side with no proxy, HAProxy and socat, and the proxy
pair beside two HAProxies run under mptcpize.

Every peer runs in a private network namespace made for it (loopback only), with a
fresh iperf3 server and echo server, and is measured on: 1- and 8-stream throughput
(iperf3 -J) with the proxy's CPU seconds per GB, ping-pong round trips/s and their
latency, new connections/s (8, 16 and 64 in flight) and their set-up time, 1000
simultaneous connects, and the memory held per idle connection (1000 and 10,000 held).
Then two namespaces joined by two 100 Mbit/s paths compare the proxy pair with MPTCP
sockets used directly and with one TCP path, and a path is cut in the middle of a
checksummed transfer.

Each figure is the median of 3 runs (the runs interleave the peers, so a burst of load on
this shared machine hits them all alike). Results: bench/results/<stamp>.jsonl (one JSON
object a line), the table in bench/README.md and the chart bench/ratios.png.

    python bench/bench.py                   the full suite (about 14 minutes)
    BENCH_QUICK=1 python bench/bench.py     one run, short durations (about 2 minutes)
    python bench/bench.py --smoke --out DIR one metric, one peer, about a second
    python bench/bench.py --report FILE     table and chart again from a results file

Needs root (network namespaces). Everything it starts is stopped and every namespace is
deleted at the end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import report
from common import (
    BENCH,
    BOOT,
    NOFILE,
    PROXY_ENV,
    PY,
    ROOT,
    TWIN_ENV,
    Plan,
    log,
    max_relayed,
)
from contenders import PEERS, variant_peer
from measure import Recorder, run_loopback
from paths import run_cut, run_shaped


def build_c(out_dir: Path, name: str, *flags: str) -> str:
    """bench/NAME.c built with cc into the results folder (again when the source is newer)."""
    src = BENCH / f"{name}.c"
    binary = out_dir / ".bin" / name
    if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(src), *flags], check=True,
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
    peers = [pe for pe in PEERS if pe.key in plan.peers or not (plan.peers or pe.optional)]
    peers += [variant_peer(spec) for spec in args.variant]
    skipped: dict[str, str] = {}
    for pe in list(peers):
        why = (f"{pe.needs} is not installed (make bench installs it)"
               if pe.needs and not shutil.which(pe.needs) else pe.check() if pe.check else None)
        if why:
            log(f"{pe.key}: skipped: {why}")
            skipped[pe.key] = why
            peers.remove(pe)

    nofile = raise_nofile()
    binary = build_c(args.out, "loadgen")
    build_c(args.out, "barerelay", "-pthread")  # beside it: contenders.barerelay() finds it
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{'smoke' if args.smoke else 'bench'}-{stamp}.jsonl"
    rec = Recorder(path)
    started = time.monotonic()
    info = machine()
    rec.emit(type="meta", plan=plan.__dict__, peers=[pe.key for pe in peers],
             quick=args.quick, smoke=args.smoke, nofile=nofile, max_relayed=max_relayed(),
             skipped=skipped, **info)
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
