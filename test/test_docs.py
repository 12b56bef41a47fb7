"""The documentation as a new user meets it: the man page's SYNOPSIS and CONFIGURATION FILE
(generated from the parser), the configuration examples (valid files, and the output
`--check-config` really prints), README links that work on a package index page, and
`make install` into a directory of one's choice.

The page is generated here as `make man` and the wheel generate it ([tool.build_manpages]
in pyproject.toml), without building anything. Against an installed wheel there is no
source tree (README.md, man/) and the module is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_packaging import (  # the same page rendering, and the same skip outside a checkout
    _missing,
    _render,
    pytestmark,  # noqa: F401
)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
OPERATING = REPO / "docs" / "operating.md"
TIMEOUT = 60


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mptcpproxy", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=cwd, env=env)


# -- the man page ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mptcp-proxy.1 from pyproject.toml's [tool.build_manpages] spec, in a subprocess (the
    generator imports man/parser.py and sets environment variables)."""
    try:
        import build_manpages  # noqa: F401
    except ImportError:
        _missing("argparse-manpage")
    out = tmp_path_factory.mktemp("man") / "mptcp-proxy.1"
    code = (
        "import sys\n"
        "from build_manpages.build_manpages import get_pyproject_settings, "
        "parse_manpages_spec\n"
        "from argparse_manpage.manpage import Manpage\n"
        "from argparse_manpage.tooling import get_parser\n"
        "((name, data),) = parse_manpages_spec(get_pyproject_settings()).items()\n"
        "parser = get_parser(data['import_type'], data['import_from'], data['objname'],\n"
        "                    data['objtype'], data.get('prog'))\n"
        "open(sys.argv[1], 'w').write(str(Manpage(parser, _data=data)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return out


def _rendered(page: Path, width: int = 200) -> str:
    proc = _render(page, width)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    # groff may print hyphens and minus signs as U+2010 / U+2212
    return proc.stdout.replace("\u2010", "-").replace("\u2212", "-")


def _section(rendered: str, heading: str) -> str:
    return re.split(r"^[A-Z][A-Z ]+$", rendered.split(f"\n{heading}\n", 1)[1], maxsplit=1,
                    flags=re.M)[0]


def test_synopsis_has_one_usage_per_line(page: Path) -> None:
    from mptcpproxy.cli import build_parser

    usages = build_parser().format_usage().removeprefix("usage: ").splitlines()
    assert len(usages) == 3, usages
    shown = [line.strip() for line in _section(_rendered(page), "SYNOPSIS").splitlines()
             if line.strip()]
    assert shown == [" ".join(u.split()) for u in usages]


@pytest.mark.parametrize("width", [80, 65])
def test_page_renders_without_warnings(page: Path, width: int) -> None:
    proc = _render(page, width)
    assert proc.returncode == 0
    assert proc.stderr == "", f"man --warnings at width {width}:\n{proc.stderr}"


def test_every_configuration_key_is_in_the_page(page: Path) -> None:
    """Each key a file takes is described, under the heading of its kind."""
    from mptcpproxy import configfile
    from mptcpproxy.cli import build_parser

    keys = {a.dest for a in build_parser()._actions
            if any(s.startswith("--") for s in a.option_strings)} - configfile.NOT_IN_FILE
    assert {"mode", "port", "remote", "workers", "metrics", "splice"} <= keys
    roff = page.read_text().split(".SH CONFIGURATION FILE\n", 1)[1].split("\n.SH ", 1)[0]
    glob, per = roff.split(".SS Global keys\n", 1)[1].split(".SS Listener keys\n", 1)
    described = {kind: set(re.findall(r"^\\fB(\w+)\\fR = ", text, re.M))
                 for kind, text in (("global", glob), ("listener", per))}
    assert described["global"] == keys & configfile.GLOBAL_KEYS
    assert described["listener"] == (keys - configfile.GLOBAL_KEYS) | configfile.LISTENER_ONLY


def test_page_example_configuration_is_valid(page: Path, tmp_path: Path) -> None:
    text = _section(_rendered(page), "CONFIGURATION FILE")
    lines = text.split("\n\n", 2)[2].split("\n   Global keys\n", 1)[0].splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    path = tmp_path / "example.toml"
    path.write_text("\n".join(line[indent:] for line in lines) + "\n")
    proc = _cli("--config", str(path), "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert "valid; 2 listeners:" in proc.stdout


# -- make install ------------------------------------------------------------------------------

def test_make_install_into_a_prefix(tmp_path: Path) -> None:
    """`make install` (README, Installing) builds a wheel with the venv running the tests and
    installs it into its own virtualenv: here PREFIX is a scratch directory, not /opt."""
    make = shutil.which("make") or _missing("'make'")
    venv = Path(sys.prefix)
    prefix = tmp_path / "opt"
    proc = subprocess.run(
        # -o: the venv running the tests stays as it is (no `make venv` into it)
        [make, "-C", str(REPO), "-o", f"{venv}/.stamp", "install", f"VENV={venv}",
         f"PREFIX={prefix}", f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from mptcpproxy import __version__

    version = subprocess.run([prefix / "bin" / "mptcp-proxy", "--version"], cwd="/",
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert version.stdout.strip() == f"mptcp-proxy {__version__}", version.stderr
    assert (prefix / "share" / "man" / "man1" / "mptcp-proxy.1").is_file()
    relay = subprocess.run(
        [prefix / "bin" / "python", "-c", "import mptcpproxy.relay._relay as r; print(r.__file__)"],
        cwd="/", capture_output=True, text=True, timeout=TIMEOUT)
    assert relay.stdout.startswith(f"{prefix}/lib/"), relay.stdout + relay.stderr
