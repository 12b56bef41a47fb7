"""Picks the relay engine: the compiled `_relay`, else the pure-Python twin `_relay_py`.

With MPTCPPROXY_REQUIRE_EXTENSION=1 a missing or broken extension is an error instead of a
silent fallback (used by `make test` and the wheel tests).
"""

from __future__ import annotations

import os

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
