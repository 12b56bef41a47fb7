"""The command-line options of keeping the client's address (issue 12): --send-proxy,
--accept-proxy, --proxy-timeout and --source, for cli.build_parser(), and what they must
agree on. Pure Python: the man page is generated from the parser before the relay is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mptcpproxy.config import Config, ConfigError


def add_options(parser: argparse.ArgumentParser, seconds: Callable[[str], float],
                seconds_range: str) -> None:
    """The option group; `seconds` converts a number of seconds as the other timeouts."""
    group = parser.add_argument_group(
        "keeping the client's address",
        "tell the service who the client is: a PROXY protocol header (HAProxy's, v1 or v2),\n"
        "or an upstream connection made from the client's own address",
    )
    group.add_argument(
        "--send-proxy", nargs="?", const="v2", choices=("v1", "v2"), metavar="v1|v2",
        help="write a PROXY protocol header (v2 for a bare --send-proxy) first on each "
             "upstream connection: the client's address (from an accepted header, else the "
             "peer) and the address it connected to (an accepted header's destination, "
             "else the listener's address, or the original destination with -t); for "
             "services that read it (nginx's listen ... proxy_protocol, HAProxy's "
             "accept-proxy) or a server proxy with --accept-proxy",
    )
    group.add_argument(
        "--accept-proxy", action="store_true",
        help="each connection must start with a PROXY protocol header (v1 or v2) naming "
             "the real client, which then appears as `client` in the log (the peer as "
             "`via`) and is passed on by --send-proxy and --source client; a connection "
             "without a valid header within --proxy-timeout is closed without a reply. "
             "Anyone who can connect can claim any address: let only the peers that send "
             "headers reach this listener (-b, firewall)",
    )
    group.add_argument(
        # default None: given or not, so that a timeout without --accept-proxy is refused
        "--proxy-timeout", type=seconds, default=None, metavar="SECONDS",
        help=f"with --accept-proxy, the time for the whole header ({seconds_range}; "
             "default: 5)",
    )
    group.add_argument(
        "--source", choices=("client",), metavar="client",
        help="client (server mode): connect to the service from the client's own address "
             "(HAProxy's usesrc clientip), the one from an accepted PROXY header or else "
             "the MPTCP peer, so a service that speaks no PROXY protocol sees it as its "
             "peer; needs CAP_NET_ADMIN, the policy routing --setup-firewall installs (or "
             "--print-firewall prints), and a service that routes the clients' addresses "
             "back through this host",
    )


def check(args: argparse.Namespace) -> None:
    """Raise ConfigError (one sentence) when these options do not fit the listener."""
    if args.proxy_timeout is not None and not args.accept_proxy:
        raise ConfigError("--proxy-timeout only applies with --accept-proxy: add "
                          "--accept-proxy, or leave --proxy-timeout out")
    if args.source == "client" and args.mode != "server":
        raise ConfigError("--source client only applies to server mode (-m server): a "
                          "client proxy connects over MPTCP to the server proxy, which can "
                          "pass the client's address on with --send-proxy")


def config_fields(args: argparse.Namespace) -> dict[str, object]:
    """The Config fields these options set."""
    return {"send_proxy": args.send_proxy, "accept_proxy": args.accept_proxy,
            "proxy_timeout": (Config.proxy_timeout if args.proxy_timeout is None
                              else args.proxy_timeout),
            "source": args.source}
