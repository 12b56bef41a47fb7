"""The AddressSanitizer pass (`make test-asan`, run by test/under-asan) tests what it claims:
the engine loaded is the ASan build, and an ASan error in any process is caught.
Skipped outside that pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SO = os.environ.get("MPTCPPROXY_RELAY_SO")
pytestmark = pytest.mark.skipif(not SO, reason="only in the ASan pass (make test-asan)")

_WHICH = "import mptcpproxy.relay._relay as r; print(r.__file__)"
# an interceptor (memmove) touching memory poisoned by hand: the smallest sure ASan error
_POISON = """
import ctypes
buf, dst = ctypes.create_string_buffer(64), ctypes.create_string_buffer(64)
ctypes.CDLL(None).__asan_poison_memory_region(buf, ctypes.c_size_t(64))
ctypes.memmove(dst, buf, 8)
"""


def test_the_engine_loaded_is_the_asan_build():
    import mptcpproxy.relay._relay as loaded
    from mptcpproxy.relay import ENGINE, Relay

    assert loaded.__file__ == SO and ENGINE == "c" and Relay is loaded.Relay
    dynamic = subprocess.run(["readelf", "-d", SO], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert "[libasan.so" in dynamic, dynamic  # built with -fsanitize=address
    maps = Path("/proc/self/maps").read_text()
    assert SO in maps and "/libasan.so" in maps  # and running with the ASan runtime
    # so do the processes the tests start (the proxies of the scenarios and the soak)
    child = subprocess.run([sys.executable, "-c", _WHICH], capture_output=True, text=True,
                           timeout=30, check=True)
    assert child.stdout.strip() == SO


def test_an_asan_error_aborts_with_a_report(tmp_path: Path):
    # its own log_path (the last one wins), not the pass's: this error is wanted
    env = {**os.environ, "ASAN_OPTIONS": f"{os.environ['ASAN_OPTIONS']}:log_path={tmp_path}/asan"}
    proc = subprocess.run([sys.executable, "-c", _POISON], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGABRT, proc
    (report,) = tmp_path.glob("asan.*")
    assert "ERROR: AddressSanitizer: use-after-poison" in report.read_text()
