"""SoftEther VPN server and client inside test-bed hosts, for the sevpn scenario.

Debian's SoftEther keeps its state in fixed paths (config, logs, pid/control/lock files,
and a unicode cache in /tmp), so two instances on one machine collide. Each daemon here
runs in a private mount namespace where its own directory (inside the bed's log
directory, removed with the bed) is bind-mounted over those paths. Stopping a daemon
stops its whole process tree (``execsvc`` forks a worker)::

    srv, cli = VpnServer(server_host), VpnClient(client_host)  # both start at once
    srv.add_hub("VPN", user="alice", password="pw", bridge_dev="eth2")
    nic = cli.add_account("10.123.200.2:443", hub="VPN", user="alice", password="pw")
    cli.connect()  # returns once the session is established
    client_host.ip("addr", "add", "10.123.210.2/24", "dev", nic)

``vpncmd`` runs with every parameter given (or it would prompt), stdin closed, a timeout,
and in the daemon's own network and mount namespaces (``nsenter``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from collections.abc import Sequence

from netns import Host
from procs import Proc, run, wait_until

__all__ = ["SoftEtherError", "VpnClient", "VpnServer", "available", "isolated"]

LIBEXEC = "/usr/libexec/softether"
VPNSERVER = f"{LIBEXEC}/vpnserver/vpnserver"
VPNCLIENT = f"{LIBEXEC}/vpnclient/vpnclient"
VPNCMD = f"{LIBEXEC}/vpncmd/vpncmd"
# where Debian's build reads and writes, each replaced by a private directory
STATE_PATHS = ("/var/lib/softether", "/var/log/softether", "/run/softether", "/tmp")
SERVER_PORT = 443  # one of the server's listeners (443/992/1194/5555)
CLIENT_ADMIN_PORT = 9931  # vpnclient's management port, on which vpncmd /CLIENT talks
VPNCMD_TIMEOUT = 20.0
# "$1".."$4" are the private directories, then the command: no quoting problems
_BIND_SCRIPT = " && ".join(
    [f'mount --bind "${i + 1}" {path}' for i, path in enumerate(STATE_PATHS)]
    + [f"shift {len(STATE_PATHS)}", 'exec "$@"']
)


class SoftEtherError(RuntimeError):
    """A vpncmd command failed or SoftEther did not reach the expected state."""


def available() -> str | None:
    """None when the SoftEther binaries are installed, else what is missing."""
    missing = [p for p in (VPNSERVER, VPNCLIENT, VPNCMD) if not os.access(p, os.X_OK)]
    if missing:
        return ("SoftEther VPN is not installed (apt-get install softether-vpnserver "
                f"softether-vpnclient softether-vpncmd): no {', '.join(missing)}")
    return None


def isolated(state_dir: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run with ``state_dir``'s subdirectories over SoftEther's paths."""
    dirs = []
    for path in STATE_PATHS:
        os.makedirs(path, exist_ok=True)  # the mount points (systemd would make them)
        d = os.path.join(state_dir, path.strip("/").replace("/", "-"))
        os.makedirs(d, exist_ok=True)
        dirs.append(d)
    return ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", _BIND_SCRIPT, "sh", *dirs, *argv]


class _Daemon:
    """A SoftEther daemon (``execsvc``: foreground, forks a worker) in its own state dir."""

    program = ""
    port = 0
    target = ""  # vpncmd's first arguments: where and what to manage

    def __init__(self, host: Host, name: str) -> None:
        self.host, self.name = host, name
        self.state_dir = tempfile.mkdtemp(prefix=f"{name}-", dir=host.bed.log_dir)
        self.proc: Proc = host.start(isolated(self.state_dir, [self.program, "execsvc"]),
                                     name=name)
        self._ready = False

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the daemon listens for vpncmd (the first vpncmd call does it too)."""
        if not self._ready:
            self.host.wait_listening(self.port, timeout, proc=self.proc)
            self._ready = True

    def vpncmd(self, *command: str, hub: str | None = None,
               timeout: float = VPNCMD_TIMEOUT) -> list[list[str]]:
        """Run one vpncmd command; return its CSV rows (header first, no banner).

        Raises :class:`SoftEtherError` with vpncmd's output when it fails.
        """
        self.wait_ready()
        argv = ["nsenter", f"--target={self.proc.pid}", "--net", "--mount",
                VPNCMD, *self.target.split(), "/PASSWORD:", "/CSV",
                *([f"/ADMINHUB:{hub}"] if hub else []), "/CMD", *command]
        try:
            res = run(argv, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise SoftEtherError(f"{self.name}: vpncmd {' '.join(command)} did not finish in "
                                 f"{timeout:g}s (a prompt for a missing parameter?)") from None
        if res.returncode != 0:
            raise SoftEtherError(f"{self.name}: vpncmd {' '.join(command)} -> error "
                                 f"{res.returncode}:\n{res.stdout.strip()}\n{res.stderr.strip()}")
        # /CSV drops the banner; only vpncmd /CLIENT still says "Connected to VPN Client ..."
        lines = [ln for ln in res.stdout.splitlines() if "," in ln]
        return list(csv.reader(lines))

    def log(self) -> str:
        """The daemon's own log files, for failure messages."""
        log_dir = os.path.join(self.state_dir, "var-log-softether")
        parts = []
        for root, _dirs, files in os.walk(log_dir):
            for fname in sorted(files):
                with open(os.path.join(root, fname), errors="replace") as f:
                    parts.append(f"--- {fname}\n{f.read()[-4000:]}")
        return "\n".join(parts)

    def describe(self) -> str:
        """Process output and SoftEther logs, for assertion messages."""
        return f"{self.proc.describe()}\n{self.log()}"

    def stop(self) -> None:
        """End the daemon with its worker (the bed would too, but slowly)."""
        # SIGKILL soon after SIGTERM: vpnserver spends seconds saving a configuration
        # that is thrown away anyway
        self.proc.stop(timeout=0.2)


class VpnServer(_Daemon):
    """``vpnserver`` in ``host``; vpncmd manages it in "server admin mode" (no password)."""

    program = VPNSERVER
    port = SERVER_PORT
    target = f"localhost:{SERVER_PORT} /SERVER"

    def __init__(self, host: Host, name: str = "vpnserver") -> None:
        super().__init__(host, name)

    def add_hub(self, hub: str, user: str, password: str, bridge_dev: str) -> None:
        """A virtual hub with one password user, bridged to ``bridge_dev`` of the host."""
        self.vpncmd("HubCreate", hub, f"/PASSWORD:{password}")
        self.vpncmd("UserCreate", user, "/GROUP:none", "/REALNAME:none", "/NOTE:none", hub=hub)
        self.vpncmd("UserPasswordSet", user, f"/PASSWORD:{password}", hub=hub)
        self.vpncmd("BridgeCreate", hub, f"/DEVICE:{bridge_dev}", "/TAP:no")


class VpnClient(_Daemon):
    """``vpnclient`` in ``host``; its NIC ``vpn_<nic>`` appears in that namespace."""

    program = VPNCLIENT
    port = CLIENT_ADMIN_PORT
    target = "localhost /CLIENT"

    def __init__(self, host: Host, name: str = "vpnclient") -> None:
        super().__init__(host, name)
        self.account = "acct"

    def add_account(self, server: str, hub: str, user: str, password: str,
                    nic: str = "se0") -> str:
        """Make the NIC and an account for ``server`` (``host:port``); return the NIC's name.

        UDP acceleration is off: it would go straight to the server's real address,
        around the proxies, fail there and drop the session.
        """
        self.vpncmd("NicCreate", nic)
        self.vpncmd("AccountCreate", self.account, f"/SERVER:{server}", f"/HUB:{hub}",
                    f"/USERNAME:{user}", f"/NICNAME:{nic}")
        self.vpncmd("AccountPasswordSet", self.account, f"/PASSWORD:{password}",
                    "/TYPE:standard")
        self.vpncmd("AccountDetailSet", self.account, "/MAXTCP:1", "/INTERVAL:1", "/TTL:0",
                    "/HALF:no", "/BRIDGE:no", "/MONITOR:no", "/NOTRACK:no", "/NOQOS:no",
                    "/DISABLEUDP:yes")
        return f"vpn_{nic}"

    def connect(self, timeout: float = 30.0) -> None:
        """Connect the account and wait until the session is established."""
        self.vpncmd("AccountConnect", self.account)
        self.wait_connected(timeout)

    def status(self) -> dict[str, str]:
        """``AccountStatusGet`` as a dict (e.g. ``"Session Status"``)."""
        return {row[0]: row[1] for row in self.vpncmd("AccountStatusGet", self.account)
                if len(row) >= 2}

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Wait until the session is established; the error shows the last status."""
        last: dict[str, str] = {}

        def established() -> bool:
            last.update(self.status())
            return "Session Established" in last.get("Session Status", "")

        try:
            wait_until(established, timeout, f"{self.name}'s VPN session", 0.2)
        except TimeoutError as e:
            raise SoftEtherError(f"{e}: {last}\n{self.describe()}") from None
