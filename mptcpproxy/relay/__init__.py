"""Picks the relay engine: the compiled `_relay`, else the pure-Python twin `_relay_py`.

With MPTCPPROXY_REQUIRE_EXTENSION=1 a missing or broken extension is an error instead of a
silent fallback (used by `make test` and the wheel tests). With MPTCPPROXY_RELAY_SO=PATH the
compiled engine is loaded from that file instead of the package (`make test-asan` points it
at the AddressSanitizer build, so the tests, their fixtures and every proxy they start run it).
"""

from __future__ import annotations

import os
import sys


def _load_relay_from(path: str) -> None:
    """Install the extension module built at `path` as `mptcpproxy.relay._relay`."""
    from importlib.machinery import ExtensionFileLoader
    from importlib.util import module_from_spec, spec_from_file_location

    if not os.path.isfile(path):
        raise ImportError(f"MPTCPPROXY_RELAY_SO={path}: no such extension module file")
    name = f"{__name__}._relay"
    spec = spec_from_file_location(name, path, loader=ExtensionFileLoader(name, path))
    module = module_from_spec(spec)
    # in sys.modules first, as importlib does: `import mptcpproxy.relay._relay` then finds
    # this one and never looks for the package's own build
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    globals()["_relay"] = module


if _so := os.environ.get("MPTCPPROXY_RELAY_SO"):
    _load_relay_from(_so)  # asked for by name: a failure is an error, never the twin

try:
    from mptcpproxy.relay._relay import Relay

    ENGINE = "c"
except ImportError as exc:
    if os.environ.get("MPTCPPROXY_REQUIRE_EXTENSION") == "1":
        raise ImportError(
            f"the compiled relay mptcpproxy.relay._relay did not load ({exc}); build it with "
            "'make build' or unset MPTCPPROXY_REQUIRE_EXTENSION"
        ) from exc
    from mptcpproxy.relay._relay_py import Relay  # type: ignore[assignment]

    ENGINE = "py"

__all__ = ["ENGINE", "Relay"]
