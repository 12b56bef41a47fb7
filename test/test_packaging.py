"""Distribution: the man page generated from `build_parser()`, what the sdist and the wheel
carry, and the cibuildwheel configuration.

The sdist and the wheel are built once for the module, from a copy of the source tree
without any generated file, with `python -m build --no-isolation` (the venv's setuptools,
Cython and argparse-manpage; `make wheel` builds with isolation). The page checked is the
one inside the wheel. Against an installed wheel (`make testinstalled`, cibuildwheel) there
is no source tree to build, and the module is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PAGE = "mptcp-proxy.1"

pytestmark = pytest.mark.skipif(
    not (REPO / "setup.py").is_file() or not (REPO / "man" / "parser.py").is_file(),
    reason="needs the source tree (setup.py, man/): these tests are running against an "
           "installed wheel",
)


def _missing(what: str) -> None:
    # In CI `make test` installs every tool (requirements-dev.txt, `make deps`): a skip there
    # would hide a broken set-up.
    if IN_CI:
        pytest.fail(f"{what} is missing under CI=true")
    pytest.skip(f"{what} is not installed (pip install -r requirements-dev.txt; make deps)")


def _tool(name: str) -> str:
    """An executable from the venv running the tests, else from PATH."""
    venv_bin = os.path.dirname(sys.executable)
    found = shutil.which(name, path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        _missing(f"'{name}'")
    return found


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def _version() -> str:
    from mptcpproxy import __version__

    return __version__


# -- built once --------------------------------------------------------------------------------

_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "wheelhouse", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", "*.so", "_relay.c", "*.html", PAGE,
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel): the wheel is built from the unpacked sdist, as `python -m build` does."""
    if importlib.util.find_spec("build") is None:
        _missing("the 'build' package")
    work = tmp_path_factory.mktemp("dists")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCES)
    out = work / "dist"
    proc = _run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        timeout=300,
    )
    assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout[-4000:]}{proc.stderr}"
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def page(dists: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The man page as the wheel installs it (<prefix>/share/man/man1)."""
    _, wheel = dists
    member = f"mptcpproxy-{_version()}.data/data/share/man/man1/{PAGE}"
    with zipfile.ZipFile(wheel) as zf:
        assert member in zf.namelist(), f"the wheel does not install {PAGE}: {zf.namelist()}"
        path = tmp_path_factory.mktemp("man") / PAGE
        path.write_bytes(zf.read(member))
    return path


def _render(page: Path, width: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "MANWIDTH": str(width), "MANPAGER": "cat", "PAGER": "cat",
           "LC_ALL": "C.UTF-8"}
    env.pop("MAN_KEEP_FORMATTING", None)
    return _run([_tool("man"), "--warnings", "-l", str(page)], env=env)


@pytest.fixture(scope="module")
def rendered(page: Path) -> str:
    proc = _render(page)
    assert proc.returncode == 0, proc.stderr
    # groff may print hyphens and minus signs as U+2010 / U+2212
    return proc.stdout.replace("\u2010", "-").replace("\u2212", "-")


# -- the man page ------------------------------------------------------------------------------

def test_page_lists_every_option_of_the_parser(page: Path) -> None:
    from mptcpproxy.cli import build_parser

    roff = page.read_text()
    flags = [flag for action in build_parser()._actions for flag in action.option_strings]
    assert "--mode" in flags and "-m" in flags
    missing = [flag for flag in flags if rf"\fB{flag.replace('-', chr(92) + '-')}\fR" not in roff]
    assert not missing, f"options of build_parser() not described in {PAGE}: {missing}"


def test_page_has_examples_kernel_settings_and_exit_codes(rendered: str) -> None:
    headings = re.findall(r"^([A-Z][A-Z ]+)$", rendered, re.MULTILINE)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES",
                    "MPTCP KERNEL SETTINGS", "EXIT STATUS", "SEE ALSO"):
        assert heading in headings, f"no {heading} section in {headings}"
    assert "mptcp-proxy - TCP to Multipath-TCP proxy" in rendered
    for text in ("mptcp-proxy -m client -p", "mptcp-proxy -m server -p", "-t redirect",
                 "-t tproxy", "net.mptcp.enabled=1", "ip mptcp limits set subflows",
                 "ip mptcp endpoint add", " signal", " subflow"):
        assert text in rendered, f"{text!r} is not in the page"
    exit_status = rendered.split("EXIT STATUS", 1)[1].split("SEE ALSO", 1)[0]
    codes = re.findall(r"^\s+([0-9])\s+(\S.*)$", exit_status, re.MULTILINE)
    assert [code for code, _ in codes] == ["0", "1", "2"], exit_status
    assert "SIGTERM" in codes[0][1] and "Start-up" in codes[1][1] and "Usage" in codes[2][1]
    assert f"mptcpproxy {_version()}" in rendered  # the footer carries the version


def test_examples_are_valid_command_lines(rendered: str, capsys: pytest.CaptureFixture) -> None:
    # The examples are prose in man/mptcp-proxy.include: the parser must still accept them.
    from mptcpproxy import cli

    examples = rendered.split("\nEXAMPLES\n", 1)[1].split("\nMPTCP KERNEL SETTINGS\n", 1)[0]
    commands = re.findall(r"^\s+mptcp-proxy (.+)$", examples, re.MULTILINE)
    assert len(commands) >= 5, examples
    for command in commands:
        parser = cli.build_parser()
        try:
            args = parser.parse_args(shlex.split(command))
            check = getattr(cli, "_check_transparent_args", None)
            if check:
                check(parser, args)
        except SystemExit:
            pytest.fail(f"example 'mptcp-proxy {command}' is refused: {capsys.readouterr().err}")


def test_man_reports_no_warnings(page: Path) -> None:
    for width in (80, 65):
        proc = _render(page, width)
        assert proc.returncode == 0
        assert proc.stderr == "", f"man --warnings at width {width}:\n{proc.stderr}"


def test_lexgrog_accepts_the_page(page: Path) -> None:
    proc = _run([_tool("lexgrog"), str(page)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"mptcp-proxy - TCP to Multipath-TCP proxy' in proc.stdout


def test_page_generation_imports_no_extension() -> None:
    # The page is generated in build_py, before build_ext, in a build environment without
    # uvloop: loading the parser must not pull in the relay or the control plane.
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(REPO / 'man' / 'parser.py')!r})['build_parser']()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    proc = _run([sys.executable, "-I", "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert "mptcpproxy.cli" in loaded
    unwanted = {"mptcpproxy.relay._relay", "mptcpproxy.relay", "mptcpproxy.control", "uvloop"}
    assert not loaded & unwanted, f"page generation imported {sorted(loaded & unwanted)}"


# -- sdist and wheel ---------------------------------------------------------------------------

def test_sdist_has_the_sources_and_nothing_generated(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    with tarfile.open(sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    sources = [p.relative_to(REPO).as_posix()
               for folder, pattern in (("mptcpproxy", "**/*.py*"), ("mptcpproxy", "**/*.px[di]"),
                                       ("test", "*.py"), ("contrib", "*"), ("man", "*"))
               for p in (REPO / folder).glob(pattern) if p.is_file() and p.suffix != ".pyc"]
    for needed in ("mptcpproxy/_relay.pyx", "mptcpproxy/relay/_relay_api.pxi",
                   "man/mptcp-proxy.include"):
        assert needed in sources
    for needed in [*sources, "pyproject.toml", "setup.py", "MANIFEST.in"]:
        assert needed in names, f"{needed} is not in {sdist.name}"
    generated = sorted(n for n in names if n.endswith((".so", ".html")) or n == PAGE
                       or (n.startswith("mptcpproxy/") and n.endswith(".c")))
    assert not generated, f"generated files in {sdist.name}: {generated}"


def test_wheel_has_the_extension_and_no_sources(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"mptcpproxy-{_version()}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        # the status page of --metrics (GET /) is a module, not a data file to forget
        status_page = zf.read("mptcpproxy/statuspage.py").decode()
    assert "<!DOCTYPE html>" in status_page and "fetch(\"/connections\"" in status_page
    assert any(re.fullmatch(r"mptcpproxy/relay/_relay\.cpython-.*\.so", n) for n in names), names
    sources = [n for n in names if n.endswith((".c", ".pyx", ".pxi"))]
    assert not sources, f"{wheel.name} carries sources: {sources}"
    assert f"\nVersion: {_version()}\n" in metadata
    assert re.search(r"^Requires-Dist: uvloop", metadata, re.MULTILINE), metadata
    assert "\nRequires-Python: >=3.10\n" in metadata
    assert re.search(r"^mptcp-proxy = mptcpproxy\.cli:main$", entry_points, re.MULTILINE)


def test_wheel_qualifies_for_manylinux2014(dists: tuple[Path, Path]) -> None:
    # The extension may use no glibc symbol newer than 2.17 (e.g. fcntl64@GLIBC_2.28, which
    # a plain fcntl() binds to with new headers): pip on older systems could not install it.
    _, wheel = dists
    proc = _run([_tool("auditwheel"), "show", str(wheel)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert '"manylinux_2_17_x86_64"' in text or '"manylinux_2_17_aarch64"' in text, text


def test_cibuildwheel_builds_cpython_310_to_313_manylinux() -> None:
    cibw = _tool("cibuildwheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIBW_")}
    proc = _run([cibw, "--print-build-identifiers", "--platform", "linux"], cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    ids = set(proc.stdout.split())
    for arch in ("x86_64", "aarch64"):
        for minor in (10, 11, 12, 13):
            assert f"cp3{minor}-manylinux_{arch}" in ids, sorted(ids)
    assert not any("musllinux" in i or "i686" in i or i.startswith("pp") for i in ids), ids
