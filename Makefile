# ccbridge — two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS := var/tools
CLAUDE_BIN := $(TOOLS)/claude/node_modules/.bin/claude
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run demo test test-fast lint claude-cli clean

install: $(STAMP)

# ccbridge with its dev extra, and the stand-ins (standins/, a dev-only project: not in the wheel or image).
$(STAMP): pyproject.toml constraints.txt standins/pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./standins -c constraints.txt
	@touch $(STAMP)

# Re-pin constraints.txt to the newest releases pyproject.toml allows (a scratch venv), then
# `make test` before committing it.
.PHONY: lock
lock:
	rm -rf var/lock-venv && $(PY) -m venv var/lock-venv
	var/lock-venv/bin/python -m pip install --quiet --upgrade pip
	var/lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; var/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^#'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf var/lock-venv

# The real Claude Code CLI from npm, into a cache dir (tests check injected homes with it).
claude-cli: $(CLAUDE_BIN)

$(CLAUDE_BIN):
	@mkdir -p $(TOOLS)/claude
	npm install --silent --no-audit --no-fund --prefix $(TOOLS)/claude @anthropic-ai/claude-code

# `make run STANDIN=1`: also the bundled OAuth stand-in, with auth and the vault pointed at it
# (README "Try it by hand"; NOT for real accounts).
run: install
	$(BIN)/ccbridge up$(if $(STANDIN), --standin-oauth)

demo: install claude-cli
	CLAUDE_BIN=$(CURDIR)/$(CLAUDE_BIN) $(BIN)/ccbridge demo

# Debian's Chromium for the connect-page browser test (Playwright drives it; never a download).
.PHONY: chromium
chromium:
	@test -x /usr/bin/chromium || { SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# ruff over everything, mypy over the code (configured in pyproject.toml); `make test` runs it first.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint claude-cli chromium
	CLAUDE_BIN=$(CURDIR)/$(CLAUDE_BIN) $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache

# Performance and reliability (docs/performance.md). One bench run: a table, docs/bench/latest.json + .png.
.PHONY: bench chaos outages soak
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# Full chaos profile: 10,000 sandbox events while services and nats-server are killed and restarted;
# then the outage profiles (below).
chaos: install
	$(BIN)/python -m bench.chaos --events $${CHAOS_EVENTS:-10000} $(CHAOS_ARGS)
	$(BIN)/python -m bench.outages --profile all --outage-s $${OUTAGE_S:-60} $(OUTAGE_ARGS)

# Outage profiles (docs/operations.md "Outages"): the vault's PostgreSQL, the vault, the OAuth token
# endpoint, e2b's API each down for OUTAGE_S (60) s under a steady stream of sandboxes.
# OUTAGE_PROFILE=postgres|vault|oauth|e2b|all (all).
outages: install
	$(BIN)/python -m bench.outages --profile $${OUTAGE_PROFILE:-all} --outage-s $${OUTAGE_S:-60} $(OUTAGE_ARGS)

# Memory under a steady stream: SOAK_RATE (80) fresh sandboxes/s for SOAK_SECONDS (300), each
# service's RSS growth per 10,000 events (target <= 1 MB). SOAK_ARGS e.g. --tracemalloc DIR.
soak: install
	$(BIN)/python -m bench.soak $(SOAK_ARGS)
