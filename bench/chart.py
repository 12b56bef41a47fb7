"""The PNG chart of `make bench`: each peer's figures as ratios to HAProxy's and to no proxy."""

from __future__ import annotations

import sys
from pathlib import Path

from figures import BY_KEY, DEFAULTS, PEER_LABELS, Results

CHART_VS_HAPROXY = ["tput1_gbps", "tput8_gbps", "rt_per_s", "rt1cpu_per_s", "rt_p99_us",
                    "conn_per_s", "conn16_per_s", "conn64_per_s",
                    "conn_p99_us", "burst_p99_ms", "idle_kib_1k", "cpu_s_per_gb"]
CHART_VS_DIRECT = ["tput1_gbps", "tput8_gbps", "rt_per_s", "rt1cpu_per_s", "conn_per_s"]
SHORT = {"tput1_gbps": "1 stream", "tput8_gbps": "8 streams", "rt_per_s": "round trips/s",
         "rt1cpu_per_s": "RT/s 1 CPU",
         "rt_p99_us": "RTT p99", "conn_per_s": "conns/s 8", "conn16_per_s": "conns/s 16",
         "conn64_per_s": "conns/s 64", "conn_p99_us": "set-up p99",
         "burst_p99_ms": "burst p99", "idle_kib_1k": "KiB/idle conn",
         "cpu_s_per_gb": "CPU s/GB"}
# round two's (issue 16) where it set one, else round one's
TARGET_RATIOS = {"tput1_gbps": 2.0, "tput8_gbps": 1.3, "rt_per_s": 1.2, "rt1cpu_per_s": 1.1,
                 "rt_p99_us": 1.0, "conn_per_s": 1.2, "conn16_per_s": 1.2, "conn64_per_s": 1.2}


def chart(r: Results, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("report: matplotlib is not installed; no chart (pip install -r "
              "bench/requirements.txt)", file=sys.stderr)
        return False
    proxies = [p for p in r.peers() if p not in ("direct", "tcp-1path", "mptcp-direct")]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8.5))

    def panel(ax, metrics, ref_of, title, peers):
        metrics = [k for k in metrics if ref_of(k) is not None]
        width = 0.8 / max(len(peers), 1)
        for i, peer in enumerate(peers):
            xs, ys = [], []
            for j, k in enumerate(metrics):
                v, ref = r.median(k, peer), ref_of(k)
                if v and ref:
                    xs.append(j + (i - (len(peers) - 1) / 2) * width)
                    ys.append(v / ref if BY_KEY[k].higher_is_better else ref / v)
            # tab20: more peers than the default cycle has colours
            ax.bar(xs, ys, width, label=PEER_LABELS.get(peer, peer), color=plt.cm.tab20(i % 20))
        for j, k in enumerate(metrics):
            if ax is axes[0] and k in TARGET_RATIOS:
                ax.hlines(TARGET_RATIOS[k], j - 0.45, j + 0.45, colors="black",
                          linestyles="dotted")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(range(len(metrics)), [SHORT[k] for k in metrics])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)

    panel(axes[0], CHART_VS_HAPROXY, lambda k: r.best(k, DEFAULTS[1])[0],
          "× HAProxy (the better of its two set-ups; higher is better, lower-is-better "
          "figures inverted; dotted: targets)", proxies)
    panel(axes[1], CHART_VS_DIRECT, lambda k: r.median(k, "direct"),
          "× no proxy (the limit)", proxies)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=4, loc="lower center")
    m = r.meta
    fig.suptitle(f"mptcpproxy bench, {m.get('date', '')}: {m.get('cores', '?')} cores, "
                 f"kernel {m.get('kernel', '?')}, median of {m.get('plan', {}).get('runs', 1)}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True
