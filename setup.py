"""Only the extension list and its compiler directives; metadata lives in pyproject.toml."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MPTCPPROXY_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        "mptcpproxy.relay._relay",
        ["mptcpproxy/relay/_relay.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=False))
