"""`make demo`: two hosts joined by two 100 Mbit/s paths; iperf3 over one plain TCP path,
then through the proxy pair (TCP -> MPTCP over both paths -> TCP); both throughputs side
by side with the MPTCP events the client host saw. Needs root; removes all it made,
also on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test"))

from netns import TestBed  # noqa: E402  (the test bed the scenario tests use)

RATE = os.environ.get("DEMO_RATE", "100mbit")
SECONDS = int(os.environ.get("DEMO_SECONDS", "5"))
EVENTS = ("CREATED", "ESTABLISHED", "ANNOUNCED", "SF_ESTABLISHED", "CLOSED")


def iperf(host, *args: str) -> float:
    """Mbit/s received, from an iperf3 client run in `host`."""
    out = host.run(["iperf3", "-J", "-t", str(SECONDS), *args], timeout=SECONDS + 60).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6


def conn_lines(proxy) -> list[str]:
    return [line for line in proxy.stderr.splitlines() if re.search(r"conn \d+ \w+[:( ]", line)]


def path_split(lines: list[str]) -> list[tuple[str, int]]:
    """The paths of the connection that moved the most, from its `paths=` (path, percent)."""
    best, split = -1, []
    for line in lines:
        m = re.search(r"sent (\d+) B received (\d+) B .* paths=(.*)$", line)
        if m and int(m[1]) + int(m[2]) > best:
            best = int(m[1]) + int(m[2])
            split = [(p.rsplit(" ", 1)[0], int(p.rsplit(" ", 1)[1].rstrip("%")))
                     for p in m[3].split(",")]
    return split


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    py = sys.executable
    with TestBed("demo") as bed:
        cli, srv = bed.host("client"), bed.host("server")
        path1 = bed.link(cli, srv, "10.123.200.1/24", "10.123.200.2/24")
        path2 = bed.link(cli, srv, "10.123.201.1/24", "10.123.201.2/24")
        for path in (path1, path2):
            path.shape(RATE)
        # The server announces its second address; the client accepts one announcement
        # and may open one extra subflow: two paths, two subflows.
        srv.mptcp_limits(subflows=1)
        srv.mptcp_endpoint("10.123.201.2", path2.dev_b, "signal")
        cli.mptcp_limits(subflows=1, add_addr_accepted=1)

        iperf_srv = srv.start(["iperf3", "-s"], name="iperf3-server")
        srv.wait_listening(5201, proc=iperf_srv)
        server = srv.start([py, "-m", "mptcpproxy", "-m", "server", "-p", "4444",
                            "-r", "localhost:5201"], name="server-proxy")
        srv.wait_listening(4444, proc=server)
        client = cli.start([py, "-m", "mptcpproxy", "-m", "client", "-p", "5555",
                            "-r", "10.123.200.2:4444"], name="client-proxy")
        cli.wait_listening(5555, proc=client)

        print(f"two paths of {RATE} each; iperf3 for {SECONDS} s per run\n")
        print("1/2 iperf3 over one path, plain TCP ...", flush=True)
        single = iperf(cli, "-c", "10.123.200.2")
        monitor = cli.monitor()
        print("2/2 iperf3 through the proxy pair (TCP -> MPTCP -> TCP) ...", flush=True)
        multi = iperf(cli, "-c", "127.0.0.1", "-p", "5555")
        deadline = time.monotonic() + 10  # the log lines follow the last bytes
        while len(conn_lines(client)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        counts = monitor.counts()

        print()
        print(f"{'':32}{'Mbit/s':>10}")
        print(f"{'one path, plain TCP':32}{single:10.1f}")
        print(f"{'proxy pair, MPTCP, two paths':32}{multi:10.1f}   ({multi / single:.2f}x)")
        for path, share in path_split(conn_lines(client)):
            print(f"  {path:30}{multi * share / 100:10.1f}   ({share}% of the bytes)")
        print("\nMPTCP events in the client host (iperf3 opens 2 connections):")
        print("  " + "  ".join(f"{name} {counts[name]}" for name in EVENTS))
        if counts["CLOSED"] < 2:
            print("  (iperf3's server closes its data connection while bytes are still in flight:"
                  "\n   that reset reaches the client as an MPTCP fast close, which the kernel"
                  "\n   reports with no CLOSED event on the side that receives it)")
        print("\nclient proxy, one line per connection:")
        for line in conn_lines(client):
            print("  " + line.split(" INFO ", 1)[-1])
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo made is removed", file=sys.stderr)
        raise SystemExit(130) from None
