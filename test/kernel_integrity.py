"""Does this kernel's MPTCP deliver the bytes it was given? A reproduction, not a test.

    python test/kernel_integrity.py [--connections N] [--runs R] [--burn K]
                                    [--checksum both|server|client] [--through-proxy]

As root. It builds test_scaleout's topology (two shaped paths, an nftables DNAT load
balancer on path 1, two backends that announce their own address for joins over path 2),
then sends N connections of 4 MiB of seeded bytes from the client host to the backends
and has them check each byte. By default the sender and the services speak MPTCP
themselves (under `mptcpize`): no mptcpproxy anywhere, so what goes wrong is the
kernel's. `--through-proxy` puts mptcpproxy's client and server proxies in the path as the
tests do. K busy loops (`--burn`, default 4) load the CPUs as a test suite does.

For each connection that arrived different it prints where: the first byte that differs,
how many, and where in the stream the bytes that arrived there belong. Exit status 1 when
any connection arrived different or got no answer (those are counted apart).

Seen on Linux 6.18.44 (2 vCPUs): about 1 connection in 100 arrived with 4-14 KiB at
offset 31,328 replaced by the bytes 48 KiB further on, with or without the proxies;
none with DSS checksums on at the receiving end (`--checksum server` or `both`), none
without the join. docs/operating.md, "Data integrity and the kernel".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_scaleout as scale  # noqa: E402
from netns import TestBed  # noqa: E402
from shaservice import stream  # noqa: E402

SIZE = 4 << 20


def diff(data: bytes, expected: bytes) -> str:
    """Where `data` differs from `expected`: offset, length, and where those bytes belong."""
    pairs = list(enumerate(zip(data, expected, strict=False)))
    first = next((i for i, (a, b) in pairs if a != b), None)
    if first is None:
        return f"{len(data)} of {len(expected)} bytes, the same as far as they go"
    last = max(i for i, (a, b) in pairs if a != b)
    found = expected.find(data[first:first + 64])
    whence = (f"the bytes of offset {found:,} ({found - first:+,})" if found >= 0
              else "bytes that are nowhere in this stream")
    return f"{last - first + 1:,} bytes from offset {first:,} differ: {whence}"


def one_run(args: argparse.Namespace, save: str) -> list[str]:
    with TestBed("integrity") as testbed:
        bed = scale.build(testbed, remedy=True)
        # build() turns the checksums on for the tests' sake: set them as asked here
        sides = {"both": ("cli", "b1", "b2"), "server": ("b1", "b2"), "client": ("cli",),
                 "off": ()}[args.checksum]
        hosts = {"cli": bed.cli, **{n: b.host for n, b in bed.backends.items()}}
        for name, host in hosts.items():
            host.sysctl("net.mptcp.checksum_enabled", int(name in sides))
        wrap = [] if args.through_proxy else ["mptcpize", "run"]
        port = scale.SVC if args.through_proxy else scale.VPORT
        for name, b in bed.backends.items():
            svc = b.host.start([*wrap, sys.executable, scale.SERVICE, "--save", save, "serve",
                                str(port), name], name="svc")
            b.host.wait_listening(port, proc=svc)
        if args.through_proxy:  # as scale.start(), in front of the saving services
            for b in bed.backends.values():
                scale.start_proxy(b.host, "-m", "server", "-r", f"127.0.0.1:{scale.SVC}",
                                  port=scale.VPORT, name="server-proxy")
            scale.start_proxy(bed.cli, "-m", "client", "-r", f"{scale.VIP}:{scale.VPORT}",
                              port=scale.CPORT, name="client-proxy")
            target = ("127.0.0.1", scale.CPORT)
        else:
            target = (scale.VIP, scale.VPORT)
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(args.burn)]
        try:
            sender = bed.cli.start([*wrap, sys.executable, scale.SERVICE, "--timeout", "30",
                                    "send", target[0], str(target[1]), str(SIZE),
                                    str(args.connections)], name="send")
            try:
                sender.wait(60 + args.connections * 5)
            except subprocess.TimeoutExpired:
                pass  # what answered is judged; the rest is said to be missing
        finally:
            for proc in burners:
                proc.kill()
                proc.wait()
        replies = [json.loads(line) for line in sender.stdout.splitlines() if '"ok"' in line]
        answered = {r["i"] for r in replies if r["backend"]}
        found = [f"connection {i}: no answer (the transfer failed, not judged)"
                 for i in range(args.connections) if i not in answered]
        for reply in (r for r in replies if r["backend"] and not r["ok"]):
            expected = b"".join(stream(reply["i"], SIZE))
            for path in Path(save).glob(f"{reply['backend']}-*.bin"):
                data = path.read_bytes()
                if data[:64] == expected[:64]:
                    found.append(f"connection {reply['i']} to {reply['backend']}: "
                                 + diff(data, expected))
        return found


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not low <= value <= 1000:
            raise argparse.ArgumentTypeError(f"{text}: a whole number from {low} to 1000")
        return value
    return parse


positive, positive_or_zero = _count(1), _count(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=positive, default=150)
    parser.add_argument("--runs", type=positive, default=1)
    parser.add_argument("--burn", type=positive_or_zero, default=4,
                        help="busy loops loading the CPUs")
    parser.add_argument("--checksum", choices=("off", "both", "server", "client"),
                        default="off", help="net.mptcp.checksum_enabled=1 where")
    parser.add_argument("--through-proxy", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    bad = missing = 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="integrity-") as save:
            found = one_run(args, save)
        lost = sum("no answer" in line for line in found)
        bad, missing = bad + len(found) - lost, missing + lost
        print(f"run {run + 1}: {args.connections} connections, {len(found) - lost} arrived "
              f"different, {lost} unanswered", flush=True)
        for line in found:
            print(f"  {line}", flush=True)
    path = "through mptcpproxy" if args.through_proxy else "no proxy"
    print(f"{bad} of {args.connections * args.runs - missing} connections arrived different"
          f"{f', {missing} unanswered' if missing else ''} (checksums: {args.checksum}; {path})")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
