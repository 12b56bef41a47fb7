"""Two namespaces joined by two shaped paths: the proxy pair against MPTCP sockets and one
TCP path, and a path cut in the middle of a checksummed transfer."""

from __future__ import annotations

import shutil
import subprocess
import time

from common import PROXY, PROXY_ENV, PY, XFER, BenchError, Plan, log
from measure import Recorder, iperf, json_line
from netns import Host, Proc, TestBed, wait_until

PATH_NETS = ("10.201.1", "10.201.2")


def two_paths(bed: TestBed, rate: str = "100mbit") -> tuple[Host, Host, list]:
    """Client and server joined by two shaped paths; the server announces the second."""
    cli, srv = bed.host("cli"), bed.host("srv")
    links = [bed.link(cli, srv, f"{net}.1/24", f"{net}.2/24") for net in PATH_NETS]
    for link in links:
        link.shape(rate, "32kb", "20ms")
    srv.mptcp_limits(subflows=1)
    srv.mptcp_endpoint(links[1].ip_b, links[1].dev_b, "signal")
    cli.mptcp_limits(subflows=1, add_addr_accepted=1)
    return cli, srv, links


def start_pair(cli: Host, srv: Host, server_addr: str, target: int) -> list[Proc]:
    common = ["-q", "--drain-timeout", "1"]
    server = srv.start([*PROXY, "-m", "server", "-p", "4444", "-r",
                        f"127.0.0.1:{target}", *common], name="server-proxy", env=PROXY_ENV)
    srv.wait_listening(4444, proc=server)
    client = cli.start([*PROXY, "-m", "client", "-p", "5555", "-r",
                        f"{server_addr}:4444", *common], name="client-proxy", env=PROXY_ENV)
    cli.wait_listening(5555, proc=client)
    return [client, server]


def run_shaped(plan: Plan, rec: Recorder) -> None:
    if not shutil.which("mptcpize"):
        log("shaped paths: mptcpize is missing (apt-get install mptcpd); skipped")
        return
    with TestBed("bench-shaped") as bed:
        cli, srv, links = two_paths(bed)
        server_addr = links[0].ip_b
        plain = srv.start(["iperf3", "-s", "-p", "5201"], name="iperf3-tcp")
        srv.wait_listening(5201, proc=plain)
        mptcp = srv.start(["mptcpize", "run", "iperf3", "-s", "-p", "5202"], name="iperf3-mptcp")
        srv.wait_listening(5202, proc=mptcp)
        start_pair(cli, srv, server_addr, 5201)
        variants = {
            "tcp-1path": (server_addr, 5201, ()),
            "mptcp-direct": (server_addr, 5202, ("mptcpize", "run")),
            "pair": ("127.0.0.1", 5555, ()),
        }
        for run in range(plan.shaped_runs):
            log(f"shaped paths, run {run + 1}/{plan.shaped_runs}")
            for key, (addr, port, wrap) in variants.items():
                try:
                    data = iperf(cli, addr, port, plan.shaped_seconds, wrap=wrap)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    log(f"  {key}: FAILED: {exc}")
                    rec.emit(type="error", peer=key, run=run, error=str(exc)[-2000:])
                    continue
                recv = data["end"]["sum_received"]
                rec.sample("shaped_mbps", key, run, recv["bits_per_second"] / 1e6,
                           bytes=recv["bytes"], seconds=recv["seconds"])


def run_cut(plan: Plan, rec: Recorder) -> None:
    """A checksummed transfer through the proxy pair; the first path is cut at a third."""
    log(f"path cut: {plan.cut_bytes >> 20} MiB through the pair, path 1 cut at a third")
    with TestBed("bench-cut") as bed:
        cli, srv, links = two_paths(bed)
        monitor = cli.monitor()
        receiver = srv.start([PY, XFER, "recv", "5201"], name="recv")
        srv.wait_listening(5201, proc=receiver)
        start_pair(cli, srv, links[0].ip_b, 5201)
        t0 = time.monotonic()
        sender = cli.start([PY, XFER, "send", "127.0.0.1", "5555", str(plan.cut_bytes)],
                           name="send")

        def progress() -> int:
            try:
                return json_line(receiver.stdout).get("progress", 0)
            except BenchError:
                return 0

        try:
            monitor.wait_for({"SF_ESTABLISHED": 1}, timeout=20)
            wait_until(lambda: progress() >= plan.cut_bytes // 3 or receiver.poll() is not None,
                       60, "a third of the transfer")
            cut_at = progress()
            links[0].down()
            t_cut = time.monotonic()
            receiver.wait(120)
            sender.wait(30)
            sent, got = json_line(sender.stdout), json_line(receiver.stdout)
        except (BenchError, AssertionError, TimeoutError, subprocess.TimeoutExpired) as exc:
            log(f"  path cut: FAILED: {exc}")
            rec.emit(type="error", peer="pair", run=0, error=str(exc)[-2000:],
                     procs=bed.describe()[-4000:])
            rec.sample("cut_intact", "pair", 0, 0, reason=str(exc)[-300:])
            return
        intact = (got.get("bytes") == sent.get("bytes") == plan.cut_bytes
                  and got.get("sha256") == sent.get("sha256") and "error" not in got)
        rec.sample("cut_intact", "pair", 0, int(intact), bytes=got.get("bytes"),
                   sha256_sent=sent.get("sha256"), sha256_received=got.get("sha256"),
                   cut_at_bytes=cut_at, seconds=round(time.monotonic() - t0, 2),
                   seconds_after_cut=round(time.monotonic() - t_cut, 2))
