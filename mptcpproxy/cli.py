"""Command line: `main(argv) -> int`, and what one listener's options must agree on
(`check_listener_args()`, `config_from_args()`, also used for each [[listener]] of a
--config file). The parser itself, `build_parser()` (also feeding the man page), is in
options.py.

Exit codes: 0 clean stop, 1 start-up failure, 2 usage error. Errors are one line on
stderr, never a traceback. This module must not import the compiled relay at import
time: the man page is generated from `build_parser()` before the extension is built.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from mptcpproxy import logsetup, originopts
from mptcpproxy.config import Config, ConfigError
from mptcpproxy.firewall import TPROXY_BASE
from mptcpproxy.options import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, PROG, build_parser

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "PROG", "build_parser",
           "check_listener_args", "config_from_args", "main"]


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
        stop_grace=args.stop_grace,
        max_connections=args.max_connections,
        buffer_size=args.buffer_size * 1024,
        splice=args.splice,
        busy_poll=args.busy_poll / 1e6,
        path_stats=args.path_stats,
        transparent=args.transparent,
        mark=args.mark,
        setup_firewall=args.setup_firewall,
        intercept=args.intercept,
        metrics=args.metrics,
        **originopts.config_fields(args),
    )


def check_listener_args(args: argparse.Namespace) -> None:
    """What one listener's options must agree on; raises ConfigError (one sentence)."""
    originopts.check(args)
    if args.transparent is None:
        if args.remote is None:
            raise ConfigError("the following argument is required: -r/--remote (or -t for "
                              "transparent mode)")
        rules = args.source == "client"  # its policy routing is a firewall set-up too
        for flag, given in (("--setup-firewall", args.setup_firewall and not rules),
                            ("--print-firewall", getattr(args, "print_firewall", False)
                             and not rules),
                            ("--intercept", bool(args.intercept))):
            if given:
                raise ConfigError(f"{flag} only applies to transparent mode: add -t"
                                  + ("" if flag == "--intercept" else
                                     " (or use it with --source client)"))
    routed = args.transparent == "tproxy" or args.source == "client"
    if routed and args.mark == TPROXY_BASE | args.port:
        raise ConfigError(f"--mark 0x{args.mark:x} is the mark this proxy's policy routing "
                          "uses (TPROXY, --source client): choose another mark")


# With --config, the command line takes only these besides --config itself.
_WITH_CONFIG = {"config", "check_config", "verbose", "quiet"}


def _given(argv: list[str] | None, allowed: frozenset[str] | set[str]) -> str:
    """The options on the command line `argv` (already parsed once), even at their default
    value (--stop-grace 0), other than `allowed` (by dest), as "-m/--mode, -p/--port"; ""
    when there are none."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only what the command line gave is set
    seen = parser.parse_args(argv)
    given = [a for a in parser._actions if a.dest not in allowed and a.option_strings
             and a.dest != "help" and hasattr(seen, a.dest)]
    return ", ".join(sorted({"/".join(a.option_strings) for a in given}))


def _from_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
               argv: list[str] | None):
    """The listeners of --config FILE; a usage error when listener options are given too."""
    from mptcpproxy import configfile

    flags = _given(argv, _WITH_CONFIG)
    if flags:
        parser.error(f"{flags}: with --config, set it in the file, not on the command line")
    try:
        return configfile.load(args.config)
    except ConfigError as exc:
        parser.exit(EXIT_USAGE, f"{PROG}: error: {exc}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGINT/SIGTERM; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGHUP (systemctl reload, logrotate) is never fatal: ignored until the log set-up or
    # the control plane's loop gives it a meaning, so no moment of the start-up dies of it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if args.connections:
        flags = _given(argv, {"connections", "json"})
        if flags:
            parser.error(f"{flags}: --connections only takes --json (it asks a running "
                         "proxy and exits)")
        from mptcpproxy.connview import run as show_connections

        return show_connections(args.connections, args.json, prog=PROG)
    if args.json:
        parser.error("--json only applies to --connections HOST:PORT")
    if args.check:
        from mptcpproxy.check import run_check

        return run_check(args.mode, bind=args.bind, source=args.source, port=args.port)
    if args.config:
        from mptcpproxy import configfile

        loaded = _from_file(parser, args, argv)
        configs, settings = list(loaded.listeners), loaded.settings
        if args.check_config:
            print(f"{args.config}: valid; {len(configs)} listener"
                  f"{'s' if len(configs) != 1 else ''}:")
            print("\n".join(configfile.describe(c) for c in configs))
            return EXIT_OK
    else:
        if args.check_config:
            parser.error("--check-config needs --config FILE")
        # -m and -p are not required=True in argparse, so that --check works without them
        missing = [flag for flag, value in (("-m/--mode", args.mode), ("-p/--port", args.port))
                   if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        try:
            check_listener_args(args)
        except ConfigError as exc:
            parser.error(str(exc))
        configs, settings = [config_from_args(args)], args
    cli_level = (logging.DEBUG if args.verbose else logging.WARNING if args.quiet else None)
    level = cli_level or (logging.DEBUG if settings.verbose else logging.WARNING
                          if settings.quiet else logging.INFO)
    try:
        logsetup.setup_logging(level, settings.log_file, settings.log_format)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.print_firewall:
        from mptcpproxy.firewall import method_for

        sys.stdout.write(method_for(configs[0]).manual())
        return EXIT_OK

    from mptcpproxy.control import StartupError, run  # the relay extension loads here

    try:
        return run(configs, args.config, cli_level)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
