"""bench/barerelay.c, the bench's floor: it relays a half-closed exchange intact, and does
not spin while one leg has hung up and the other does not take its bytes."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "barerelay.c"
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def barerelay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SOURCE.exists() or shutil.which("cc") is None:
        pytest.skip("bench/barerelay.c or a C compiler is not here")
    binary = tmp_path_factory.mktemp("barerelay") / "barerelay"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(binary),
                    str(SOURCE)], check=True, timeout=60)
    return binary


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_hung_up_upstream_with_a_slow_client_neither_spins_nor_loses_bytes(
        barerelay: Path) -> None:
    # The client sends its request and half-closes; the upstream answers 3 MiB and closes.
    # The client does not read for a second: the relay holds what the client cannot take,
    # and the upstream socket, its FIN in, has hung up both ways (EPOLLHUP, which epoll
    # reports whatever the interest). Before the fix the relay spun on it: a whole CPU.
    answer = os.urandom(3 << 20)
    with socket.socket() as srv, socket.socket() as probe:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()

        def upstream() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                while conn.recv(65536):
                    pass
                conn.sendall(answer)

        server = threading.Thread(target=upstream, daemon=True)
        server.start()
        relay = subprocess.Popen([str(barerelay), str(port), "127.0.0.1",
                                  str(srv.getsockname()[1])])
        try:
            with socket.socket() as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                client.settimeout(TIMEOUT)
                deadline = time.monotonic() + TIMEOUT
                while client.connect_ex(("127.0.0.1", port)) != 0:
                    assert time.monotonic() < deadline, "barerelay does not listen"
                    time.sleep(0.05)
                client.sendall(b"GET")
                client.shutdown(socket.SHUT_WR)
                server.join(TIMEOUT)  # the upstream has sent all and closed
                assert not server.is_alive()
                time.sleep(0.3)  # its FIN reaches the relay
                before = _cpu_seconds(relay.pid)
                time.sleep(1.0)  # the client does not read
                spent = _cpu_seconds(relay.pid) - before
                got = bytearray()
                while data := client.recv(1 << 20):
                    got += data
        finally:
            relay.terminate()
            relay.wait(TIMEOUT)
    assert hashlib.sha256(got).digest() == hashlib.sha256(answer).digest(), len(got)
    assert spent < 0.5, f"barerelay spent {spent:.2f} s of CPU in 1 s with nothing to do"
