"""Running the firewall's commands: each a `Step` (an argv list, never a shell string, and
its stdin), found on PATH or in /usr/sbin and /sbin, with one sentence when it fails; and
whether this process may change the network set-up at all (CAP_NET_ADMIN).
The rules themselves, as data, are in firewall.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import NamedTuple

CAP_NET_ADMIN = 12
COMMAND_TIMEOUT = 10.0
_SBIN = ("/usr/sbin", "/sbin")


class FirewallError(Exception):
    """Installing or removing the rules failed; the message is one sentence."""


class Step(NamedTuple):
    """One command: argv (never a shell string) and what it reads on stdin."""

    argv: tuple[str, ...]
    input: str | None = None


Runner = Callable[[Step], None]


def _find(tool: str) -> str | None:
    path = os.environ.get("PATH", os.defpath)
    return shutil.which(tool, path=os.pathsep.join([path, *_SBIN]))


def run_step(step: Step) -> None:
    """Run one step; raise FirewallError naming the command and the tool's message."""
    exe = _find(step.argv[0]) or step.argv[0]
    try:
        res = subprocess.run(
            [exe, *step.argv[1:]], input=step.input, capture_output=True, text=True,
            timeout=COMMAND_TIMEOUT, stdin=None if step.input is not None else subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"'{shlex.join(step.argv)}' could not run: {exc}") from None
    if res.returncode != 0:
        lines = (res.stderr.strip() or res.stdout.strip() or f"exit {res.returncode}").splitlines()
        raise FirewallError(f"'{shlex.join(step.argv)}' failed: {lines[0].strip()}")


def has_cap_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (effective set, /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def commands(steps: Sequence[Step]) -> list[list[str]]:
    """The argv lists of `steps` (for tests and logs)."""
    return [list(step.argv) for step in steps]
