"""The options of `mptcp-proxy`: `build_parser()`, the one parser, which also feeds the man
page (man/parser.py) and the keys of a --config file (configfile.py), with the converters
that check each value and say what is wrong in one sentence.

Pure Python: the man page is generated from `build_parser()` before the relay is built, so
nothing here imports the extension or the control plane.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from mptcpproxy import __version__, logsetup, originopts
from mptcpproxy.config import (
    MAX_BUFFER_KIB,
    MAX_BUSY_POLL_USEC,
    MAX_CONNECTIONS,
    MAX_SECONDS,
    MAX_WORKERS,
    MIN_BUFFER_KIB,
    MIN_SECONDS,
    ConfigError,
    parse_bind,
    parse_hostport,
    parse_mark,
    parse_port,
    parse_port_ranges,
)

PROG = "mptcp-proxy"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
A TCP <-> Multipath-TCP (MPTCP) proxy for Linux. In client mode it accepts plain TCP
connections and forwards each one over MPTCP to a server-mode proxy; in server mode it
accepts MPTCP connections and forwards each one over plain TCP to the service. Put a
client proxy next to a TCP-only application and a server proxy next to the service, and
the application's traffic uses every network path the kernel's MPTCP path manager opens,
for more throughput and for surviving the loss of a path.
"""

EPILOG = """\
examples:
  mptcp-proxy -m client -p 5555 -r 10.0.1.2:4444
      accept TCP on port 5555, forward over MPTCP to the server proxy at 10.0.1.2:4444
  mptcp-proxy -m server -p 4444 -r localhost:80
      accept MPTCP on port 4444, forward over TCP to the local web server
  mptcp-proxy -m client -p 5555 -r [2001:db8::2]:4444 --workers 2 -v
  mptcp-proxy -m client -p 5555 -t tproxy --setup-firewall --intercept 80,443
      on a gateway: intercept the LAN's TCP connections to ports 80 and 443 and carry
      each one over MPTCP to its original destination (see docs/transparent.md)
  mptcp-proxy --connections 127.0.0.1:9541
      the open connections of the proxy running with --metrics 127.0.0.1:9541, and the
      share of each path (MPTCP subflow); the same as a page at http://127.0.0.1:9541/

exit codes: 0 clean stop (SIGINT/SIGTERM), 1 start-up failure (--connections: no
answer), 2 usage error.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage dump: scripts and people read the sentence.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _whole(minimum: int, maximum: int, unit: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also for a number of more than 4300 digits
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}{unit} must be at least {minimum}{unit}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value}{unit} must be at most {maximum}{unit}")
        return value
    return parse


_workers = _whole(1, MAX_WORKERS)
_buffer_kib = _whole(MIN_BUFFER_KIB, MAX_BUFFER_KIB, " KiB")
_busy_poll_usec = _whole(0, MAX_BUSY_POLL_USEC, " us")
_connections = _whole(1, MAX_CONNECTIONS)
SECONDS_RANGE = f"{MIN_SECONDS:g}-{MAX_SECONDS} s"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # inf would overflow the engine's nanoseconds, nan is no time
        raise argparse.ArgumentTypeError(
            f"'{text[:40]}' is not a number of seconds (use {SECONDS_RANGE})")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    if value < MIN_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} s is below the minimum of {MIN_SECONDS:g} s (use {SECONDS_RANGE})")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} s is above the maximum of {MAX_SECONDS} s (use {SECONDS_RANGE})")
    return value


def _seconds_or_zero(text: str) -> float:
    """0 (off), or seconds as _seconds takes them."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _seconds(text)


def build_parser() -> argparse.ArgumentParser:
    """The one parser of `mptcp-proxy`, also used to generate the man page."""
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} -m {{client,server}} -p PORT (-r HOST:PORT | -t [MODE]) [options]\n"
              f"       {PROG} --config FILE [--check-config] [-v | -q]\n"
              f"       {PROG} --check [-m {{client,server}}] [-b ADDR]\n"
              f"       {PROG} --connections HOST:PORT [--json]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-m", "--mode", choices=("client", "server"),
        help="client: accept TCP, connect upstream with MPTCP; "
             "server: accept MPTCP, connect upstream with TCP",
    )
    parser.add_argument(
        "-p", "--port", type=_typed(parse_port), metavar="PORT",
        help="local port to listen on (1-65535)",
    )
    parser.add_argument(
        "-r", "--remote", type=_typed(parse_hostport), metavar="HOST:PORT",
        help="upstream address: 10.0.1.2:4444, [2001:db8::2]:4444 or name:port; a name is "
             "resolved anew for the new connections (once for those accepted together) and "
             "every address it returns is tried; "
             "required unless -t is given. With -t it is where connections go that were not "
             "intercepted (that came straight to the listener); without it those are refused",
    )
    transparent = parser.add_argument_group(
        "transparent mode",
        "intercept connections with firewall rules and relay each one to its original\n"
        "destination (client: TCP in, MPTCP out; server: MPTCP in, TCP out)",
    )
    transparent.add_argument(
        "-t", "--transparent", nargs="?", const="redirect", choices=("redirect", "tproxy"),
        help="redirect (the default for a bare -t): nat REDIRECT rules, the original "
             "destination comes from SO_ORIGINAL_DST or conntrack; tproxy: TPROXY rules and "
             "a transparent listener",
    )
    transparent.add_argument(
        "--mark", type=_typed(parse_mark), default=0, metavar="N",
        help="set this firewall mark (SO_MARK) on every upstream connection, so rules can "
             "skip the proxy's own traffic (needs CAP_NET_ADMIN); the other way is to run "
             "the proxy as a dedicated user and match its uid",
    )
    transparent.add_argument(
        "--setup-firewall", action="store_true",
        help="install the interception rules (nftables table inet mptcpproxy_PORT, and the "
             "policy routing TPROXY needs), or those of --source client, at start and remove "
             "them at exit; needs nft and CAP_NET_ADMIN",
    )
    transparent.add_argument(
        "--print-firewall", action="store_true",
        help="print those rules as shell commands, for installing them by hand, and exit "
             "(with or without --setup-firewall)",
    )
    transparent.add_argument(
        "--intercept", type=_typed(parse_port_ranges), default=(), metavar="PORTS",
        help="destination ports the rules intercept, e.g. 80,443,8000-8100 (default: all TCP)",
    )
    originopts.add_options(parser, _seconds, SECONDS_RANGE)
    parser.add_argument(
        "-b", "--bind", type=_typed(parse_bind), metavar="ADDR",
        help="local address to listen on (default: dual-stack :: that also accepts IPv4, "
             "or 0.0.0.0 where IPv6 is off)",
    )
    parser.add_argument(
        "--disable-mptcp", action="store_true",
        help="use plain TCP on both legs",
    )
    parser.add_argument(
        "--workers", type=_workers, default=0, metavar="N",
        help=f"relay threads, 1-{MAX_WORKERS} (default: the number of CPUs, at most "
             f"{MAX_WORKERS})",
    )
    parser.add_argument(
        "--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
        help=f"give up connecting upstream after this long ({SECONDS_RANGE}; default: 10)",
    )
    parser.add_argument(
        "--idle-timeout", type=_seconds, default=0.0, metavar="SECONDS",
        help="close a connection when no byte moved either way for this long "
             f"({SECONDS_RANGE}; default: never)",
    )
    parser.add_argument(
        "--drain-timeout", type=_seconds, default=30.0, metavar="SECONDS",
        help="on SIGTERM/SIGINT stop accepting (after --stop-grace) and let open "
             "connections finish for this long, then close them; meanwhile the listener stays "
             "open for their MPTCP joins and resets new connections, unless another process "
             f"serves the port ({SECONDS_RANGE}; default: 30)",
    )
    parser.add_argument(
        "--stop-grace", type=_seconds_or_zero, default=0.0, metavar="SECONDS",
        help="after SIGTERM/SIGINT keep accepting new connections for this long while "
             "/ready (with --metrics) answers 503, so that a load balancer's health check "
             "takes this proxy out first; then drain (0 or "
             f"{SECONDS_RANGE}; default: 0)",
    )
    parser.add_argument(
        "--buffer-size", type=_buffer_kib, default=512, metavar="KIB",
        help=f"relay buffer in KiB, {MIN_BUFFER_KIB}-{MAX_BUFFER_KIB}: each read is up to "
             "this size, and it bounds what the proxy holds for a connection whose receiver "
             "does not keep up (default: 512)",
    )
    parser.add_argument(
        "--splice", action=argparse.BooleanOptionalAction, default=False,
        help="move bulk transfers with splice() through a pipe, never copying them to user "
             "space: less CPU per byte; each splicing direction holds a pipe (2 fds) "
             "(default: off)",
    )
    parser.add_argument(
        "--busy-poll", type=_busy_poll_usec, default=0, metavar="USEC",
        help="after each event, keep polling without sleeping for USEC microseconds: lower "
             "latency for request/response traffic, at the cost of a busy CPU while traffic "
             f"flows (0-{MAX_BUSY_POLL_USEC}; default: 0, off; 50 is a good start)",
    )
    parser.add_argument(
        "--path-stats", action=argparse.BooleanOptionalAction, default=True,
        help="sample the subflows of each MPTCP connection once a second and at its end: "
             "which paths carried the bytes, in the connection-end line, /connections and "
             "the path metrics; --no-path-stats samples only the subflow count "
             "(default: on)",
    )
    parser.add_argument(
        "--max-connections", type=_connections, default=0, metavar="N",
        help=f"above N open connections, new ones are closed at once (1-{MAX_CONNECTIONS}; "
             "default: no limit)",
    )
    parser.add_argument(
        "--metrics", type=_typed(parse_hostport), metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9541; "
             "every address only when written out: [::]:9541), "
             "the open connections at /connections and a status page showing them at /; "
             "no authentication: bind it to a loopback or management address",
    )
    parser.add_argument(
        "--connections", type=_typed(parse_hostport), metavar="HOST:PORT",
        help="print the open connections of the proxy whose --metrics address is HOST:PORT "
             "and exit: one line per connection (client, upstream, age, bytes each way, "
             "MPTCP) and one per path (subflow) with its share of the bytes, then the totals "
             "per local address; exit 1 when it does not answer. The same at "
             "http://HOST:PORT/connections (JSON) and as a page at http://HOST:PORT/",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="with --connections: print the JSON document instead of the table",
    )
    parser.add_argument(
        "--log-file", metavar="PATH",
        help="log to this file instead of stderr; SIGHUP reopens it (for logrotate)",
    )
    parser.add_argument(
        "--log-format", choices=logsetup.FORMATS, default="text",
        help="text lines, or json: one object per line, with the fields of each "
             "connection's end (default: text)",
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help="read the listeners and settings from this TOML file (see CONFIGURATION FILE "
             "in the man page); SIGHUP reloads it. The listener options (-m, -p, -r, ...) "
             "then go in the file, not on the command line",
    )
    parser.add_argument(
        "--check-config", action="store_true",
        help="with --config: check the file, print the listeners it defines and exit (0: "
             "valid, 2: not); run it before a reload",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="say whether MPTCP can open extra subflows here (MPTCP enabled, path manager, "
             "limits, endpoints, with the commands that fix them) and exit: 0 when it can, "
             "1 when not; with -m only for that side; with -b, for a server listening there; "
             "with --source client, also what that needs (1 without CAP_NET_ADMIN)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-v", "--verbose", action="store_true", help="log each connection's set-up too (DEBUG)"
    )
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="log only warnings and errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser
