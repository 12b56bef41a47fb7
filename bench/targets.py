"""The issue's targets, each judged from the medians of one results file."""

from __future__ import annotations

from dataclasses import dataclass

from figures import DEFAULTS, PEER_LABELS, Results, fmt


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




# Round two (issue 16): the default command line (an INFO line per connection), judged
# once; the same figures with -q are shown beside them.
PAIR, HAPROXY_PAIR = "pair", "haproxy-pair"
BARE, BARE_PAIR = "bare", "bare-pair"  # bench/barerelay.c: the floor
# round one's targets that must not regress (by name, as targets() names them)
KEEP = ("8-stream throughput vs HAProxy", "new connections/s vs HAProxy",
        "1000 simultaneous connects: all served, p99 set-up",
        "memory per idle connection (worst of 1000 / 10,000 held)",
        "10,000 concurrent connections held, no error", "proxy CPU per GB relayed (1 stream)",
        "two shaped paths: proxy pair vs MPTCP sockets",
        "path cut mid-transfer: nothing lost (sha256)")
CONCURRENCIES = ((8, "conn_per_s"), (16, "conn16_per_s"), (64, "conn64_per_s"))


def _versus(r: Results, metric: str, ours: str, theirs: tuple[str, ...],
            goal: float) -> tuple[str, float | None]:
    """'1.23× (ours vs theirs NAME)' and the ratio (None: not measured)."""
    ref, which = r.best(metric, theirs)
    value = r.median(metric, ours)
    ratio = _ratio(value, ref)
    if ratio is None:
        return "–", None
    return (f"{_times(ratio, goal)} ({fmt(metric, value)} vs {fmt(metric, ref)} "
            f"{PEER_LABELS[which]})", ratio)


def _worst(r: Results, ours: str, ref: tuple[str, ...], goal: float) -> tuple[str, float | None]:
    """The worst of the three connection rates, as _versus gives it, and its ratio."""
    rates = [(ratio, n, measured) for n, metric in CONCURRENCIES
             for measured, ratio in [_versus(r, metric, ours, ref, goal)] if ratio is not None]
    if not rates:
        return "–", None
    ratio, n, measured = min(rates)
    return f"{measured}, the worst: at {n} in flight", ratio


def round_two(r: Results) -> list[tuple[Target, str, str]]:
    """Issue 16's targets: (the target with the default command line, the same with -q, the
    same for the bare C relay: the floor, what a relay reaches with nothing but its
    system calls)."""
    out: list[tuple[Target, str, str]] = []
    theirs = DEFAULTS[1]

    def row(name: str, metric: str, goal: float, ours: str = "tcp",
            ref: tuple[str, ...] = theirs, quiet: str | None = "tcp-quiet",
            floor: str = BARE) -> None:
        measured, ratio = _versus(r, metric, ours, ref, goal)
        alt = _versus(r, metric, quiet, ref, goal)[0] if quiet else "–"
        out.append((Target(name, f"≥ {goal:g}×", measured,
                           None if ratio is None else ratio >= goal), alt,
                    _versus(r, metric, floor, ref, goal)[0]))

    for n, metric in CONCURRENCIES:
        row(f"new connections/s vs HAProxy, {n} in flight", metric, 1.2)
    row("ping-pong round trips/s vs HAProxy, two CPUs", "rt_per_s", 1.2)
    row("ping-pong round trips/s vs HAProxy, all on one CPU", "rt1cpu_per_s", 1.1)
    ref = (HAPROXY_PAIR,)
    row("pair vs HAProxy pair under mptcpize: 1 stream", "tput1_gbps", 1.5, PAIR, ref, None,
        BARE_PAIR)
    measured, ratio = _worst(r, PAIR, ref, 1.2)
    out.append((Target("pair vs HAProxy pair under mptcpize: new connections/s (8, 16, 64 "
                       "in flight)", "≥ 1.2× each", measured,
                       None if ratio is None else ratio >= 1.2), "–",
                _worst(r, BARE_PAIR, ref, 1.2)[0]))
    kept = [t for t in targets(r) if t.name in KEEP]
    judged_kept = [t for t in kept if t.ok is not None]
    missed = [t.name for t in judged_kept if not t.ok]
    out.append((Target("round one's reached targets still reached (table below)",
                       "all", "–" if not judged_kept else
                       f"{len(judged_kept) - len(missed)} of {len(judged_kept)}"
                       + (f"; missed: {', '.join(missed)}" if missed else ""),
                       None if not judged_kept else not missed), "–", "–"))
    return out
