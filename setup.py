"""Only the extension list and its compiler directives; metadata lives in pyproject.toml.

MPTCPPROXY_DEBUG=1: -O0 -g and bounds checks (`make debug`). MPTCPPROXY_ASAN=1: built with
AddressSanitizer (`make asan`, into build/asan, never in place: see the Makefile).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MPTCPPROXY_DEBUG") == "1"
ASAN = os.environ.get("MPTCPPROXY_ASAN") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

if ASAN:
    # -O1 keeps the reports' stacks readable at a tolerable speed (the ASan manual's advice)
    cflags = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
elif DEBUG:
    cflags = ["-O0", "-g"]
else:
    cflags = ["-O2"]

extensions = [
    Extension(
        "mptcpproxy.relay._relay",
        ["mptcpproxy/_relay.pyx"],  # the package's agreed place; its includes and .pxd in relay/
        extra_compile_args=cflags,
        extra_link_args=["-fsanitize=address"] if ASAN else [],
    ),
    # the experimental io_uring engine (issue 16): optional, see below
    Extension(
        "mptcpproxy.relay._uring",
        ["mptcpproxy/_uring.pyx"],
        extra_compile_args=cflags,
        extra_link_args=["-fsanitize=address"] if ASAN else [],
    ),
]
OPTIONAL = {"mptcpproxy.relay._uring"}

modules = cythonize(extensions, compiler_directives=directives, annotate=False)
for module in modules:
    # a compiler that cannot build an optional module leaves it out (a warning) and the
    # build goes on; set here because cythonize() does not carry `optional` over
    module.optional = module.name in OPTIONAL
setup(ext_modules=modules)
