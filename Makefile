# Two entry points on a fresh Debian 12 (root): `make run` and `make test`.
# Both install what they need first (apt packages, the virtualenv, the tiny image) and are
# idempotent: a second run only does what is missing.

PYTHON ?= python3
VENV := .venv
VMKIT := $(VENV)/bin/vmkit
export VMKIT_HOME ?= /var/lib/vmkit

.PHONY: run test setup deps venv bytecode web image lint unit integration bench clean

run: setup
	$(VENV)/bin/python scripts/demo.py

test: setup lint
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=30 tests

setup: deps venv bytecode web image

deps:
	bash scripts/install-host-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# vmkit's modules compiled once, as pip does for an installed wheel: without it every command
# compiles them again (130 ms) when PYTHONDONTWRITEBYTECODE is set or src/ is not writable.
# Only changed modules are compiled again.
bytecode: venv
	$(VENV)/bin/python -m compileall -q src/vmkit

# the dashboard's JavaScript libraries, pinned by web/package-lock.json (nothing from a CDN)
web: web/node_modules/.installed

web/node_modules/.installed: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error
	touch $@

image: venv
	$(VMKIT) image build tiny

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=30 tests/unit tests/golden

bench: setup
	$(VENV)/bin/python bench/cli.py
	$(VENV)/bin/python bench/boot.py
	$(VENV)/bin/python bench/machine_types.py
	$(VENV)/bin/python bench/snapshot.py
	$(VENV)/bin/python bench/density.py
	$(VENV)/bin/python bench/guest_boot.py
	$(VENV)/bin/python bench/network.py
	$(VENV)/bin/python bench/migrate.py
	$(VENV)/bin/python bench/migrate_tls.py
	$(VENV)/bin/python bench/libvirt.py

clean:
	rm -rf $(VENV) build src/*.egg-info web/node_modules
