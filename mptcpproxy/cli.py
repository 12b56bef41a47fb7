"""Command line: `build_parser()` (also feeds the man page) and `main(argv) -> int`.

Exit codes: 0 clean stop, 1 start-up failure, 2 usage error. Errors are one line on
stderr, never a traceback. This module must not import the compiled relay at import
time: the man page is generated from `build_parser()` before the extension is built.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mptcpproxy import __version__
from mptcpproxy.config import Config, ConfigError, parse_bind, parse_hostport, parse_port

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

exit codes: 0 clean stop (SIGINT/SIGTERM), 1 start-up failure, 2 usage error.
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The one parser of `mptcp-proxy`, also used to generate the man page."""
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-m", "--mode", required=True, choices=("client", "server"),
        help="client: accept TCP, connect upstream with MPTCP; "
             "server: accept MPTCP, connect upstream with TCP",
    )
    parser.add_argument(
        "-p", "--port", required=True, type=_typed(parse_port), metavar="PORT",
        help="local port to listen on (1-65535)",
    )
    parser.add_argument(
        "-r", "--remote", required=True, type=_typed(parse_hostport), metavar="HOST:PORT",
        help="upstream address: 10.0.1.2:4444, [2001:db8::2]:4444 or name:port; a name is "
             "resolved for each new connection and every address it returns is tried",
    )
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
        "--workers", type=_positive_int, default=0, metavar="N",
        help="relay threads (default: the number of CPUs)",
    )
    parser.add_argument(
        "--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
        help="give up connecting upstream after this long (default: 10)",
    )
    parser.add_argument(
        "--idle-timeout", type=_seconds, default=0.0, metavar="SECONDS",
        help="close a connection when no byte moved either way for this long "
             "(default: never)",
    )
    parser.add_argument(
        "--drain-timeout", type=_seconds, default=30.0, metavar="SECONDS",
        help="on SIGTERM/SIGINT stop accepting at once and let open connections finish "
             "for this long, then close them (default: 30)",
    )
    parser.add_argument(
        "--max-connections", type=_positive_int, default=0, metavar="N",
        help="above N open connections, new ones are closed at once (default: no limit)",
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


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        mode=args.mode,
        port=args.port,
        remote=args.remote,
        bind=args.bind,
        disable_mptcp=args.disable_mptcp,
        workers=args.workers,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
    )


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGINT/SIGTERM; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    _setup_logging(args)

    from mptcpproxy.control import StartupError, run  # the relay extension loads here

    try:
        return run(config)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
