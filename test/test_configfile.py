"""--config FILE: the TOML format, its checks (one line naming file, line and key), and
--check-config."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mptcpproxy.config import ConfigError
from mptcpproxy.configfile import load

GATEWAY = """\
# a gateway with three ports
workers = 2
metrics = "127.0.0.1:9541"
connect_timeout = 5          # a default for every listener

[[listener]]
name = "vpn"
mode = "client"
port = 5555
remote = "10.0.1.2:4444"

[[listener]]
mode = "client"
port = 5556
remote = "[2001:db8::2]:4444"
idle_timeout = 600
splice = true

[[listener]]
mode = "client"
port = 5557
transparent = "redirect"
intercept = "80,443"
connect_timeout = 3
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mptcp-proxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_gateway_with_three_ports(tmp_path):
    loaded = load(write(tmp_path, GATEWAY))
    vpn, v6, gw = loaded.listeners
    assert [c.port for c in loaded.listeners] == [5555, 5556, 5557]
    assert (vpn.name, vpn.mode, str(vpn.remote), vpn.connect_timeout) == (
        "vpn", "client", "10.0.1.2:4444", 5.0)
    assert (v6.remote.host, v6.idle_timeout, v6.splice, v6.connect_timeout) == (
        "2001:db8::2", 600.0, True, 5.0)
    assert (gw.transparent, gw.intercept, gw.remote, gw.connect_timeout) == (
        "redirect", ((80, 80), (443, 443)), None, 3.0)
    assert all(c.workers == 2 and str(c.metrics) == "127.0.0.1:9541"
               for c in loaded.listeners)
    assert loaded.lines == {0: 6, 1: 12, 2: 19}


@pytest.mark.parametrize("text, message", [
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nretries = 3\n",
     ":5: retries: unknown key"),
    ("[[listener]]\nmode = 'client'\nport = '5555'\nremote = 'a:1'\n",
     ":3: port: must be a whole number"),
    ("[[listener]]\nmode = 'client'\nport = 5555\nremote = 'a:1'\nsplice = 'yes'\n",
     ":5: splice: must be true or false, not a string"),
    ("[[listener]]\nmode = 'proxy'\nport = 1\nremote = 'a:1'\n",
     ":2: mode: 'proxy' is not one of client, server"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nconnect_timeout = -1\n",
     ":5: connect_timeout: -1 must be more than 0 seconds"),
    ("[[listener]]\nmode = 'client'\nport = 70000\nremote = 'a:1'\n",
     ":3: port: port 70000 is out of range"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = '10.0.0.1'\n",
     ":4: remote: '10.0.0.1' has no port"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nworkers = 2\n",
     ":5: workers: is a setting of the whole process"),
    ("workers = 2\n", "no [[listener]] table"),
    ("[[listener]]\nmode = 'client'\nremote = 'a:1'\n", ":1: listener 1: port is missing"),
    ("[[listener]]\nmode = 'client'\nport = 1\n",
     ":1: listener 1 (port 1): the following argument is required: -r/--remote"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\n"
     "[[listener]]\nmode = 'server'\nport = 1\nremote = 'b:2'\n",
     ":7: port: port 1 is already the port of listener 1 (line 3)"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nname = 'x'\n"
     "[[listener]]\nmode = 'server'\nport = 2\nremote = 'b:2'\nname = 'x'\n",
     ":10: name: 'x' is already the name of listener 1"),
    ("check = true\n[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\n",
     ":1: check: is a command-line option"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nsetup_firewall = true\n",
     "--setup-firewall only applies to transparent mode"),
    # TOML syntax errors in the same form as the others: file:line: what
    ("port = = 1\n", "mptcp-proxy.toml:1: Invalid value (column 8)"),
    ("workers = 2\n\n[[listener]\n", "mptcp-proxy.toml:3: "),
    ("workers = 2\nlog_file = \"x", "mptcp-proxy.toml:2: Unterminated string (at the end of "
     "the file)"),
    # --proxy-timeout without --accept-proxy: in a listener, and as a default for none
    ("[[listener]]\nmode = 'server'\nport = 1\nremote = 'a:1'\nproxy_timeout = 3\n",
     ":5: proxy_timeout: only applies with accept_proxy = true"),
    ("proxy_timeout = 3\n[[listener]]\nmode = 'server'\nport = 1\nremote = 'a:1'\n",
     ":1: proxy_timeout: only applies with accept_proxy = true, which no listener has"),
    # tables and dotted keys that are not settings name their own line
    ("[listener]\nmode = 'client'\nport = 1\nremote = 'a:1'\n",
     ":1: listener: write each listener as a [[listener]] table"),
    ("workers = 2\n\n[global]\nverbose = true\n", ":3: global: unknown key"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nfoo.bar = 1\n",
     ":5: foo: unknown key"),
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\n[[listener]]\nport = 2\n"
     "[listener.tls]\nx = 1\n", ":7: tls: unknown key"),
    # a name goes into log lines and --check-config's output: no line breaks in it
    ("[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nname = \"vpn\\nconn 9 closed\"\n",
     ":5: name: must be printable text"),
])
def test_mistakes_are_one_line_naming_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(path), text
    assert message in text, text


def test_a_default_proxy_timeout_holds_for_the_listeners_that_accept_headers(tmp_path):
    a, b = load(write(tmp_path, "proxy_timeout = 3\n[[listener]]\nmode = 'server'\nport = 1\n"
                                "remote = 'a:1'\naccept_proxy = true\n[[listener]]\n"
                                "mode = 'server'\nport = 2\nremote = 'a:1'\n")).listeners
    assert (a.accept_proxy, a.proxy_timeout, b.accept_proxy) == (True, 3.0, False)


def test_a_byte_order_mark_is_skipped(tmp_path):
    """Editors on Windows may start a UTF-8 file with a BOM (EF BB BF)."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GATEWAY.encode())
    assert len(load(str(path)).listeners) == 3


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file .*: No such"):
        load(str(tmp_path / "nope.toml"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=30)


def test_check_config_prints_the_effective_listeners(tmp_path):
    proc = _cli("--config", write(tmp_path, GATEWAY), "--check-config")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "3 listeners" in out
    assert "vpn: client, port 5555 (TCP) -> 10.0.1.2:4444 over MPTCP" in out
    assert "5557: client, port 5557 (TCP) -> the original destination (-t redirect" in out
    assert "connect_timeout 3" in out and "idle_timeout 600" in out


def test_check_config_fails_with_exit_2_and_the_line(tmp_path):
    path = write(tmp_path, "[[listener]]\nmode = 'client'\nport = 1\nremote = 'a:1'\nfoo = 1\n")
    proc = _cli("--config", path, "--check-config")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mptcp-proxy: error: {path}:5: foo: unknown key"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", [["-p", "1"], ["-m", "client"], ["-r", "a:1"], ["-t"]])
def test_a_file_and_listener_flags_together_are_a_usage_error(tmp_path, flag):
    proc = _cli("--config", write(tmp_path, GATEWAY), *flag)
    assert proc.returncode == 2
    assert "--config" in proc.stderr and "Traceback" not in proc.stderr
