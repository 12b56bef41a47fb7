"""Processes for the test bed: run to completion, or start in their own session and stop
with their whole process tree (SIGTERM, then SIGKILL after a timeout).

Commands are argv lists (never shell strings) and every blocking call has a timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = ["DEFAULT_TIMEOUT", "Proc", "kill_pids", "run", "wait_until"]

T = TypeVar("T")
DEFAULT_TIMEOUT = 15.0


def run(
    argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion (text mode, output captured).

    Raises ``RuntimeError`` naming the command and its stderr when ``check`` and the
    exit code is not 0; ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> exit {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return res


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``pred()`` until it returns a truthy value, which is returned.

    Raises ``TimeoutError`` mentioning ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def _stat() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, ppid, pgrp)}`` of every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name may hold spaces and parentheses: split after the last ')'
                    state, ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            out[int(entry)] = (state, int(ppid), int(pgrp))
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for p, (_, ppid, _) in _stat().items():
        children.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def kill_pids(pids: Iterable[int], pgid: int | None = None, timeout: float = 5.0) -> None:
    """End ``pids`` and the members of process group ``pgid``.

    Each gets one SIGTERM (a second one could interrupt a graceful shutdown); whatever
    is still alive after ``timeout`` gets SIGKILL.
    """
    def alive() -> set[int]:
        procs = _stat()
        return {p for p, (state, _, pgrp) in procs.items()
                if (p in targets or pgrp == pgid) and state != "Z"}

    targets = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = alive()
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        targets |= left
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            left = alive()
        if not left:
            return


class Proc:
    """A process started in its own session (process group); output goes to files.

    ``stop()`` ends it with its whole process tree: SIGTERM, then SIGKILL after a timeout.
    """

    def __init__(self, argv: Sequence[str], name: str, log_dir: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.argv, self.name = list(argv), name
        self.stdout_path = os.path.join(log_dir, f"{name}.out")
        self.stderr_path = os.path.join(log_dir, f"{name}.err")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=err, start_new_session=True,
                                          env=None if env is None else {**os.environ, **env})
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.popen.poll()

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the exit code (``subprocess.TimeoutExpired`` after ``timeout``)."""
        return self.popen.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself (not its group)."""
        self.popen.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """End the process tree (SIGTERM, SIGKILL after ``timeout``); return the exit code."""
        # the tree catches children that left the group, the group those that were orphaned
        kill_pids(_tree(self.pid) if self.popen.poll() is None else (), self.pid, timeout)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @property
    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        with open(self.stdout_path, errors="replace") as f:
            return f.read()

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def describe(self) -> str:
        """A short text with argv, exit code and output, for assertion messages."""
        return (f"--- {self.name} (pid {self.pid}, rc {self.popen.poll()}): {' '.join(self.argv)}\n"
                f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")
