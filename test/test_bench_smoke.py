"""`make bench` keeps working: its smoke mode (ping-pong through mptcpproxy, in a private
namespace, about a second) writes JSON lines and a table. No figure is judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def test_bench_smoke_writes_results_and_table(tmp_path: Path) -> None:
    if not BENCH.exists():
        pytest.skip("bench/ is not in this tree (a run against the installed wheel)")
    readme = tmp_path / "README.md"
    res = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path), "--readme", str(readme)],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (results,) = tmp_path.glob("smoke-*.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]

    meta = records[0]
    assert meta["type"] == "meta" and meta["smoke"] is True
    for key in ("date", "kernel", "cores", "mptcpproxy", "iperf3", "plan", "peers"):
        assert key in meta, key
    assert meta["peers"] == ["tcp"]
    assert records[-1]["type"] == "end"
    assert not [r for r in records if r["type"] == "error"], records

    samples = {r["metric"]: r for r in records if r["type"] == "sample"}
    assert set(samples) == {"rt_per_s", "rt_p50_us", "rt_p99_us", "rt_cpu_us"}
    for metric, sample in samples.items():
        assert sample["peer"] == "tcp" and sample["run"] == 0, sample
        assert sample["value"] > 0, (metric, sample)
    assert samples["rt_per_s"]["count"] > 0 and samples["rt_per_s"]["errors"] == 0

    table = readme.read_text()
    assert "<!-- bench:begin -->" in table and "<!-- bench:end -->" in table
    assert "| ping-pong round trips/s (1/s) |" in table
    assert "mptcpproxy TCP→TCP" in table
