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
import textwrap
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
    assert len(usages) == 4, usages
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


# -- the configuration examples ---------------------------------------------------------------

def _blocks(path: Path, lang: str = "") -> list[str]:
    """The fenced code blocks of a Markdown file (with `lang`: only those of that language)."""
    return [textwrap.dedent(m[2]) for m in re.finditer(r"^ *```(\w*)\n(.*?)^ *```$",
                                                       path.read_text(), re.M | re.S)
            if not lang or m[1] == lang]


def test_readme_configuration_file_is_valid_and_prints_what_readme_shows(tmp_path: Path):
    (example,) = _blocks(README, "toml")
    (shown,) = [b for b in _blocks(README) if b.startswith("$ mptcp-proxy --config ")]
    command, _, output = shown.partition("\n")
    documented = command.split()[3]  # $ mptcp-proxy --config PATH --check-config
    assert command == f"$ mptcp-proxy --config {documented} --check-config"
    path = tmp_path / "gw.toml"
    path.write_text(example)
    proc = _cli("--config", str(path), "--check-config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.replace(str(path), documented) == output
    # a gateway with three ports, one of them transparent
    listeners = output.splitlines()[1:]
    assert len(listeners) == 3 and sum("the original destination" in li for li in listeners) == 1


def test_operating_guide_example_and_its_mistake(tmp_path: Path) -> None:
    examples = _blocks(OPERATING, "toml")
    assert examples
    for example in examples:
        path = tmp_path / "edge.toml"
        path.write_text(example)
        proc = _cli("--config", str(path), "--check-config")
        assert proc.returncode == 0, proc.stderr
    # the mistake the guide shows is what the proxy says about that line of the first one
    (shown,) = [b for b in _blocks(OPERATING) if b.startswith("$ mptcp-proxy --config edge.toml")]
    command, message = shown.splitlines()
    key = re.search(r"edge\.toml:\d+: (\w+): (\S+) ", message)
    (tmp_path / "edge.toml").write_text(
        re.sub(rf"^{key[1]} = \S+", f"{key[1]} = {key[2]}", examples[0], count=1, flags=re.M))
    proc = _cli(*command.split()[2:], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message



def test_operating_guide_names_every_global_key_and_every_json_field() -> None:
    """A key the guide does not list as global (path_stats) is taken for a listener's and
    put in a [[listener]] table, where it is a mistake; a field of the JSON end line the
    guide does not name is one nobody finds."""
    from mptcpproxy import configfile, connlog
    from mptcpproxy.connlog import Conn
    from mptcpproxy.relay._results import Result

    text = OPERATING.read_text()
    listed = re.search(r"\*\*Global keys\*\* hold for the whole process: (.*?)\. In a",
                       text, re.S)[1]
    assert set(re.findall(r"`(\w+)`", listed)) == configfile.GLOBAL_KEYS
    logs = text[text.index("## Logs"):text.index("## Signals")]
    _, fields = connlog.end_line(Result(1, 0, 0, 0.0, "closed", 0, True, 1),
                                 Conn(("127.0.0.1", 1), ("127.0.0.1", 2), True))
    named = set(re.findall(r"`(\w+)`", logs)) | {  # `mptcp_bytes_sent/received/retrans`
        f"mptcp_bytes_{x}" for xs in re.findall(r"`mptcp_bytes_(\w+)/(\w+)/(\w+)`", logs)
        for x in xs}
    assert not set(fields) - named, set(fields) - named

# -- README on a package index page --------------------------------------------------------------

HOME = "https://github.com/mptcpproxy/mptcpproxy"


def _slugs(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", markdown, flags=re.M | re.S),
                          re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_readme_links_are_absolute_and_lead_somewhere() -> None:
    """PyPI shows README.md without the repository: a relative link (a file, or an anchor,
    which PyPI's rendering does not give its headings) would lead nowhere."""
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)  # [text](target)
    links += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, re.M)  # [label]: target
    links += re.findall(r"""(?:href|src)=["']([^"']+)""", text)  # HTML
    assert links
    relative = [link for link in links if not re.match(r"https?://", link)]
    assert not relative, f"relative links in README.md: {relative}"
    for link in links:
        if not link.startswith(HOME):
            continue
        rest = link[len(HOME):]
        path, _, anchor = rest.partition("#")
        if path in ("", "/"):
            target = README
        else:
            m = re.fullmatch(r"/(?:blob|tree)/main/(.+)", path)
            assert m, f"{link}: not a file of the main branch"
            target = REPO / m[1]
            assert target.exists(), f"{link}: {m[1]} is not in the repository"
        if anchor:
            assert anchor in _slugs(target.read_text()), f"{link}: no such heading"


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
