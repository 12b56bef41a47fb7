"""A real browser for the status page: Debian's headless Chromium loads a URL, runs its
script for a while of virtual time (fetches included) and prints the rendered DOM, which
is parsed here into a small tree to look things up by class.

Chromium is a test dependency (`make deps` installs it): without it the browser tests skip,
except under CI=true, where a skip would hide a broken set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
VOID = {"meta", "link", "br", "img", "input", "hr", "source", "wbr"}


def chromium() -> str:
    """The chromium executable; skips the test (fails under CI) when there is none."""
    # Debian's chromium (make deps), else a Chrome already there (a GitHub runner's)
    path = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
    if path is None:
        if IN_CI:
            pytest.fail("chromium is missing under CI=true (make deps installs it)")
        pytest.skip("needs chromium (apt-get install chromium; make deps)")
    return path


def dump_dom(url: str, budget_ms: int = 2500, wrap: Sequence[str] = (),
             timeout: float = 60.0) -> str:
    """The DOM of `url` after `budget_ms` of virtual time, as Chromium serializes it.
    `wrap`: a command prefix (e.g. `ip netns exec NS`) to run the browser in."""
    with tempfile.TemporaryDirectory(prefix="mptcpproxy-chromium-") as profile:
        # root needs --no-sandbox; the profile directory keeps parallel runs apart
        argv = [*wrap, chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and proc.stdout.strip(), (
        f"chromium exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    @property
    def text(self) -> str:
        """The text content, as textContent gives it."""
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.walk()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.classes)]

    def by_id(self, ident: str) -> Node:
        (found,) = [n for n in self.walk() if n.attrs.get("id") == ident]
        return found


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", {}, None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_endtag(self, tag: str) -> None:
        node = self.cur
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse(html: str) -> Node:
    """The serialized DOM as a tree of Nodes."""
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
