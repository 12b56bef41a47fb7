"""The compiled engine's Result.paths (PathList, af92b4d) against what Python code may do
with it: it is a Sequence equal to the tuple of its PathStat, as the twin's tuple is."""

from __future__ import annotations

import collections.abc
import subprocess
import sys

import pytest
from test_paths_unit import A, B, C, D, answer, sf

_relay = pytest.importorskip("mptcpproxy.relay._relay")


def _paths():
    _, paths, *_ = _relay._fold_samples(
        [answer([sf(1, A, B, acked=60), sf(2, C, D, acked=40)], acked=100)])
    return paths


@pytest.mark.parametrize("use", ["len(p)", "p.text", "bool(p)", "list(p)"])
def test_a_pathlist_made_from_python_does_not_crash_the_interpreter(use) -> None:
    """The class is reachable (type(result.paths)); making one must not kill the process."""
    code = ("from mptcpproxy.relay._relay import PathList\n"
            f"p = PathList()\ntry:\n    {use}\nexcept (TypeError, ValueError):\n    pass\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-500:])


def test_the_engines_paths_have_the_sequence_methods() -> None:
    paths = _paths()
    items = tuple(paths)
    assert isinstance(paths, collections.abc.Sequence)
    assert paths.index(items[1]) == 1 and paths.count(items[0]) == 1
    # and the tuple's operators
    assert paths + () == items and () + paths == items and paths * 2 == items * 2
    assert paths <= items and not paths < items and (*items, 1) > paths
