"""The parser `mptcp-proxy.1` is generated from (see [tool.build_manpages] in pyproject.toml).

It is `mptcpproxy.cli.build_parser()` without the epilog: `--help` shows examples and exit
codes there, while the page has full EXAMPLES and EXIT STATUS sections from
`mptcp-proxy.include`. Two sections are written here from the same parser, so that a new
option reaches them without an edit: the SYNOPSIS, one usage per line (argparse-manpage
would join the lines of `usage` into one), and CONFIGURATION FILE, the keys of a `--config`
file (the long options, global or per listener as `configfile` says) with their help.
argparse-manpage loads this file by path during `build_py`, before the extension is built,
so only the pure-Python CLI modules are imported here.
"""

import argparse
import importlib
import re
import sys
import types
from pathlib import Path

# The source tree (or unpacked sdist) this file belongs to, ahead of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptcpproxy import cli  # noqa: E402

# The keys only a [[listener]] table has (configfile.LISTENER_ONLY) are not options, so
# their help is written here; a new one without help stops the page's generation.
LISTENER_ONLY_HELP = {
    "name": "the listener's name: its log lines and metrics carry it instead of the port, "
            "and it takes the socket systemd passes with this FileDescriptorName= (see "
            "ENVIRONMENT); unique in the file",
}

EXAMPLE = """\
workers = 2
metrics = "127.0.0.1:9541"
connect_timeout = 5     # a default for every listener

[[listener]]
name = "web"
mode = "client"
port = 8080
remote = "192.0.2.2:4444"

[[listener]]
mode = "server"
port = 4444
remote = "localhost:80"
idle_timeout = 600
"""


def _configfile() -> types.ModuleType:
    try:
        return importlib.import_module("mptcpproxy.configfile")
    except ModuleNotFoundError as exc:
        # Python 3.10 reads TOML with tomli, which a build environment may lack; the page
        # only needs configfile's key sets, never its parser: a placeholder stands in
        # while configfile is imported, and is gone again for whatever imports tomli next.
        if exc.name != "tomli":
            raise
        sys.modules["tomli"] = types.ModuleType("tomli")
        try:
            return importlib.import_module("mptcpproxy.configfile")
        finally:
            del sys.modules["tomli"]


def roff(text: str) -> str:
    """Text as roff sees it literally: backslashes and minus signs escaped, no request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def synopsis(parser: argparse.ArgumentParser) -> str:
    """One line per usage: the program and the options in bold, their values in italics."""
    usages = parser.format_usage().split(":", 1)[1].strip().splitlines()
    lines = []
    for usage in usages:
        prog, _, rest = usage.strip().partition(" ")
        words = []
        for piece in re.split(r"(--?[a-z][\w-]*|\b[A-Z][A-Z:]*[A-Z]\b)", rest):
            if piece.startswith("-"):
                words.append(f"\\fB{roff(piece)}\\fR")
            elif piece.isupper():
                words.append(f"\\fI{roff(piece)}\\fR")
            else:
                words.append(roff(piece))
        # \\% at each word's start: a usage is cut between words, never inside one
        text = re.sub(r"(?:^|(?<= ))(?=\S)", r"\\%", "".join(words))
        lines.append(f".B {roff(prog)}\n{text}")
    return "\n.br\n".join(lines)


def _value(action: argparse.Action) -> str:
    """What the key takes, in TOML, as roff."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        return "\\fBtrue\\fR | \\fBfalse\\fR"
    if action.choices:
        words = [f'\\fB"{roff(str(c))}"\\fR' for c in action.choices]
        if action.nargs == "?":  # -t alone: true stands for the bare flag
            words.append(f"\\fBtrue\\fR (\\fB\"{roff(str(action.const))}\"\\fR)")
        return " | ".join(words)
    metavar = f"\\fI{roff(action.metavar or action.dest.upper())}\\fR"
    kind = getattr(action.type, "__name__", "")
    if kind == "_seconds":
        return f"{metavar} (a number)"
    if kind in ("port", "parse"):  # cli's whole-number converters
        return f"{metavar} (a whole number)"
    if kind == "mark":
        return f'{metavar} (a whole number, or a string such as "0x100")'
    return f'"{metavar}"'


def _key(key: str, value: str, help_text: str) -> str:
    return f".TP\n\\fB{roff(key)}\\fR = {value}\n{roff(help_text)}"


def configuration_file(parser: argparse.ArgumentParser) -> str:
    """The CONFIGURATION FILE section: the format, then every key it takes with its help."""
    cf = _configfile()
    keys = {a.dest: a for a in parser._actions
            if any(s.startswith("--") for s in a.option_strings) and a.dest not in cf.NOT_IN_FILE}
    glob = [_key(k, _value(a), a.help) for k, a in keys.items() if k in cf.GLOBAL_KEYS]
    per = [_key(k, '"\\fINAME\\fR"', LISTENER_ONLY_HELP[k]) for k in sorted(cf.LISTENER_ONLY)]
    per += [_key(k, _value(a), a.help) for k, a in keys.items() if k not in cf.GLOBAL_KEYS]
    example = "\n".join(roff(line) for line in EXAMPLE.splitlines())
    return "\n".join([
        "With \\fB\\-\\-config\\fR \\fIFILE\\fR the listeners and settings come from a TOML "
        "file, and one process serves every listener.",
        "Its keys are the long options with _ for \\-",
        "(\\fB\\-\\-connect\\-timeout\\fR is \\fBconnect_timeout\\fR), checked as the "
        "command line checks them.",
        "Global keys hold for the whole process.",
        "Each \\fB[[listener]]\\fR table is one listener, on one port; a listener key "
        "written above the first table is a default for every listener, which a table may "
        "override.",
        "A mistake is one line naming the file, the line and the key, and exit status 2.",
        ".PP",
        "\\fBmptcp\\-proxy \\-\\-config\\fR \\fIFILE\\fR \\fB\\-\\-check\\-config\\fR checks "
        "the file and prints the listeners it defines; SIGHUP reads it again (see SIGNALS).",
        "On the command line, \\fB\\-\\-config\\fR takes only \\fB\\-\\-check\\-config\\fR, "
        "\\fB\\-v\\fR and \\fB\\-q\\fR besides.",
        ".PP",
        ".RS", ".nf", example, ".fi", ".RE",
        ".SS Global keys",
        *glob,
        ".SS Listener keys",
        *per,
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    parser.epilog = None
    # argparse-manpage's list of extra sections, which mptcp-proxy.include adds to: its
    # "synopsis" replaces the one-line SYNOPSIS, the others follow OPTIONS in this order.
    parser._manpage = [
        {"heading": "synopsis", "content": synopsis(parser)},
        {"heading": "configuration file", "content": configuration_file(parser)},
    ]
    return parser
