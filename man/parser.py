"""The parser `mptcp-proxy.1` is generated from (see [tool.build_manpages] in pyproject.toml).

It is `mptcpproxy.cli.build_parser()` without the epilog: `--help` shows examples and exit
codes there, while the page has full EXAMPLES and EXIT STATUS sections from
`mptcp-proxy.include`. argparse-manpage loads this file by path during `build_py`, before
the extension is built, so only the pure-Python CLI modules are imported here.
"""

import argparse
import sys
from pathlib import Path

# The source tree (or unpacked sdist) this file belongs to, ahead of any installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mptcpproxy import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    parser.epilog = None
    return parser
