"""mptcpproxy: a TCP <-> Multipath-TCP proxy for Linux."""

__version__ = "0.1.0"

__all__ = ["__version__"]
