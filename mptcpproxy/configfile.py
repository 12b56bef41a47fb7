"""`--config FILE`: a TOML file with global settings and `[[listener]]` tables.

The keys are the long options of the command line (`--connect-timeout` is
`connect_timeout`), checked by the same converters as the command line: `cli.build_parser()`
is the one source of truth for names, types, ranges and help. Global keys (`workers`,
`metrics`, logging, ...) hold for the whole process; a listener key at the top level is a
default for every listener; a `[[listener]]` table gives one listener (one port) and may
override any default. A mistake is one line naming the file, the line and the key.

    workers = 2
    metrics = "127.0.0.1:9541"
    connect_timeout = 5            # a default for every listener

    [[listener]]
    mode = "client"
    port = 5555
    remote = "10.0.1.2:4444"
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from mptcpproxy.config import Config, ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# Settings of the whole process: one relay, one metrics server, one log.
GLOBAL_KEYS = frozenset({
    "workers", "buffer_size", "busy_poll", "path_stats", "drain_timeout", "stop_grace",
    "metrics", "log_file", "log_format", "verbose", "quiet",
})
# Options that are commands or belong to the command line alone.
NOT_IN_FILE = frozenset({
    "help", "version", "check", "check_config", "config", "print_firewall", "connections",
    "json",
})
MAX_LISTENERS = 128  # what the relay serves at once (Relay.listen)
# Keys that only a [[listener]] table has.
LISTENER_ONLY = frozenset({"name"})


@dataclass(frozen=True)
class Loaded:
    """A loaded file: the namespace of global settings and one Config per listener."""

    settings: argparse.Namespace
    listeners: tuple[Config, ...]
    lines: dict[int, int]  # listener index -> the line of its [[listener]] header


class _Lines:
    """Where each key stands in the file: (table, index, key) -> line number. tomllib
    gives no positions, so the text is scanned: a key is a bare or quoted name at the start
    of a line followed by `=`, outside multi-line strings and arrays."""

    NAME = r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+'
    KEY = re.compile(rf'^\s*({NAME})(?:\s*\.\s*(?:{NAME}))*\s*=')  # a.b = 1: the key a

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[str, int, str], int] = {}
        self.tables: dict[tuple[str, int], int] = {}
        table, index, counts = "", 0, {}
        depth, in_string = 0, ""
        for number, line in enumerate(text.splitlines(), 1):
            if in_string:
                if in_string in line:
                    in_string = ""
                continue
            stripped = line.strip()
            if depth == 0 and stripped.startswith("["):
                name = stripped.strip("[] \t").split("#")[0].strip().strip("]").strip()
                index = counts.get(name, 0)
                counts[name] = index + 1
                table = name
                self.tables[(table, index)] = number
                # the header is also a key of its parent table: [global] the top-level key
                # "global", [listener.tls] the key "tls" of the [[listener]] above it
                parent, _, last = name.rpartition(".")
                self.keys.setdefault((parent, max(counts.get(parent, 1) - 1, 0), last), number)
                continue
            match = self.KEY.match(line) if depth == 0 else None
            if match:
                self.keys.setdefault((table, index, match.group(1).strip("\"'")), number)
            body = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", line.split("#")[0])
            for quote in ('"""', "'''"):
                if body.count(quote) % 2:
                    in_string = quote
            depth += body.count("[") - body.count("]")
            depth = max(depth, 0)

    def key(self, table: str, index: int, key: str) -> int:
        return self.keys.get((table, index, key)) or self.tables.get((table, index), 0)


class _FileError(ConfigError):
    pass


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The long options a file may set: dest -> action."""
    out = {}
    for action in parser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in NOT_IN_FILE:
            out[action.dest] = action
    return out


def _kind(value: object) -> str:
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


_STRINGS = ("hostport", "bind", "port_ranges")  # converters of text options
_WHOLE = ("port", "parse")  # converters of whole numbers (options._whole's is "parse")


def _convert(action: argparse.Action, value: object) -> object:
    """The value as the command line would have it after parsing; ConfigError if wrong."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, not {_kind(value)}")
        return value
    if action.nargs == "?" and isinstance(value, bool):  # -t: true is the bare flag
        return action.const if value else None
    kind = getattr(action.type, "__name__", "") if action.type is not None else ""
    if kind in _WHOLE or kind in ("_seconds", "_seconds_or_zero"):
        whole = kind in _WHOLE
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise ConfigError(f"must be {'a whole number' if whole else 'a number of seconds'}"
                              f", not {_kind(value)}")
        text = str(value)
    elif kind == "mark" and isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ConfigError(f"must be a string, not {_kind(value)}")
    try:
        result = action.type(text) if action.type is not None else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if action.choices is not None and result not in action.choices:
        raise ConfigError(f"'{text}' is not one of {', '.join(map(str, action.choices))}")
    return result


def _syntax_error(path: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's "Invalid value (at line 1, column 8)" as `path:1: Invalid value (column 8)`,
    the form of the other mistakes."""
    what = str(exc)
    at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", what, re.DOTALL)
    if at:
        return f"{path}:{at[2]}: {at[1]} (column {at[3]})"
    end = re.fullmatch(r"(.*) \(at end of document\)", what, re.DOTALL)
    if end:
        return f"{path}:{max(len(text.splitlines()), 1)}: {end[1]} (at the end of the file)"
    return f"{path}: {what}"


def load(path: str) -> Loaded:
    """Read and check `path`; raise ConfigError with `path:line: key: what is wrong`."""
    from mptcpproxy import cli  # the parser: names, converters, ranges

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")  # skips a byte order mark, which TOML does not allow
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(path, text, exc)) from None
    lines = _Lines(text)
    parser = cli.build_parser()
    options = _options(parser)
    defaults = {dest: action.default for dest, action in options.items()}

    def fail(table: str, index: int, key: str, what: str) -> ConfigError:
        return ConfigError(f"{path}:{lines.key(table, index, key)}: {key}: {what}")

    def take(table: str, index: int, key: str, value: object) -> object:
        if key not in options:
            hint = " (only a [[listener]] table has it)" if key in LISTENER_ONLY else ""
            raise fail(table, index, key, f"unknown key{hint}")
        try:
            return _convert(options[key], value)
        except ConfigError as exc:
            raise fail(table, index, key, str(exc)) from None

    top = {k: v for k, v in data.items() if k != "listener"}
    settings, listener_defaults = dict(defaults), {}
    for key, value in top.items():
        if key in NOT_IN_FILE:
            raise fail("", 0, key, "is a command-line option, not a setting")
        (settings if key in GLOBAL_KEYS else listener_defaults)[key] = take("", 0, key, value)
    tables = data.get("listener", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise fail("", 0, "listener", "write each listener as a [[listener]] table")
    if not tables:
        raise ConfigError(f"{path}: no [[listener]] table: the file must define at least one")
    if len(tables) > MAX_LISTENERS:
        raise ConfigError(f"{path}: {len(tables)} listeners: one process serves at most "
                          f"{MAX_LISTENERS}")
    if settings.get("verbose") and settings.get("quiet"):
        raise fail("", 0, "quiet", "verbose and quiet cannot both be true")
    configs, headers = [], {}
    for index, table in enumerate(tables):
        values = {**settings, **listener_defaults}
        name = None
        for key, value in table.items():
            if key == "name":
                if not isinstance(value, str) or not value:
                    raise fail("listener", index, key, "must be a non-empty string")
                if not value.isprintable():  # it goes into log lines
                    raise fail("listener", index, key, "must be printable text: no line "
                               "breaks or other control characters")
                name = value
                continue
            if key in GLOBAL_KEYS:
                raise fail("listener", index, key,
                           "is a setting of the whole process: move it above the first "
                           "[[listener]]")
            if key in NOT_IN_FILE:
                raise fail("listener", index, key, "is a command-line option, not a setting")
            values[key] = take("listener", index, key, value)
        if values.get("proxy_timeout") is not None and not values.get("accept_proxy"):
            if "proxy_timeout" in table:
                raise fail("listener", index, "proxy_timeout",
                           "only applies with accept_proxy = true")
            values["proxy_timeout"] = None  # a default, for the listeners that take headers
        for required in ("mode", "port"):
            if values.get(required) is None:
                raise ConfigError(f"{path}:{lines.tables.get(('listener', index), 0)}: "
                                  f"listener {index + 1}: {required} is missing")
        args = argparse.Namespace(**values)
        try:
            cli.check_listener_args(args)
            config = cli.config_from_args(args)
        except ConfigError as exc:
            raise ConfigError(f"{path}:{lines.tables.get(('listener', index), 0)}: "
                              f"listener {index + 1} (port {values['port']}): {exc}") from None
        first = next((i for i, c in enumerate(configs) if c.port == config.port), None)
        if first is not None:
            raise fail("listener", index, "port",
                       f"port {config.port} is already the port of listener {first + 1} "
                       f"(line {lines.key('listener', first, 'port')})")
        if name is not None:
            config = config.with_name(name)
        if config.title in headers:
            raise fail("listener", index, "name",
                       f"'{config.title}' is already the name of listener "
                       f"{headers[config.title] + 1}")
        headers[config.title] = index
        configs.append(config)
    if "proxy_timeout" in listener_defaults and not any(c.accept_proxy for c in configs):
        raise fail("", 0, "proxy_timeout",
                   "only applies with accept_proxy = true, which no listener has")
    header_lines = {i: lines.tables.get(("listener", i), 0) for i in range(len(tables))}
    return Loaded(argparse.Namespace(**settings), tuple(configs), header_lines)


def describe(config: Config) -> str:
    """One line for --check-config: what the listener does, and its non-default settings."""
    target = (f"the original destination (-t {config.transparent})" if config.transparent
              else str(config.remote))
    where = f"{config.bind or '*'}:{config.port}" if config.bind else f"port {config.port}"
    details = [f"connect_timeout {config.connect_timeout:g}"]
    if config.idle_timeout:
        details.append(f"idle_timeout {config.idle_timeout:g}")
    for key in ("max_connections", "mark"):
        if getattr(config, key):
            details.append(f"{key} {getattr(config, key)}")
    if config.intercept:
        details.append("intercept " + ",".join(
            str(a) if a == b else f"{a}-{b}" for a, b in config.intercept))
    if config.splice:
        details.append("splice")
    if config.setup_firewall:
        details.append("setup_firewall")
    if config.accept_proxy:
        details.append(f"accept_proxy (proxy_timeout {config.proxy_timeout:g})")
    if config.send_proxy:
        details.append(f"send_proxy {config.send_proxy}")
    if config.source:
        details.append(f"source {config.source}")
    legs = ("MPTCP" if config.listen_mptcp else "TCP", "MPTCP" if config.upstream_mptcp else "TCP")
    return (f"  {config.title}: {config.mode}, {where} ({legs[0]}) -> {target} over {legs[1]}; "
            + ", ".join(details))
