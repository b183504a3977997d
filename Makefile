# ckptd: the two commands a newcomer needs are `make demo` and `make test`.
# Each sets up what it needs: Debian packages (if missing), a venv, and pip packages.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Debian packages: venv support, and systemd-analyze for the unit-file test.
APT_PACKAGES := python3-venv python3-dev systemd
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup demo test lint check bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    $(AS_ROOT) apt-get update -qq && $(AS_ROOT) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The demo tracks a process it starts itself: it needs ptrace of its own child, which
# root (or the same user, without Yama restrictions) may do.
demo: setup
	$(PY) -m ckptd.demo

lint: setup
	$(VENV)/bin/ruff check ckptd tests bench
	$(VENV)/bin/mypy

# Tests that need root (ptrace, userfaultfd) skip with a reason when run without it.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_capture.py
	$(PY) bench/bench_service.py big --duration 180
	$(PY) bench/bench_service.py small --duration 120 --warmup 150
	$(PY) bench/bench_service.py small-engine --duration 40
	$(PY) bench/bench_floor.py
	$(PY) bench/bench_compaction.py --snapshots 60

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
