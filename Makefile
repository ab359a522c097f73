# The front door: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/local.toml
# The local config's simulated Azure upstream checks this key, like Azure checks yours.
export RELAY_SIMULATOR_KEY ?= local-simulator-key

# The compat suite's Node clients (tests/compat/node), pinned by its package-lock.json.
NODE_DIR := tests/compat/node
NODE_DEPS := $(NODE_DIR)/node_modules/.package-lock.json
# Its Python agent frameworks (LiveKit Agents, Pipecat): a venv of their own, pinned by
# requirements.txt, so their dependencies never meet the relay's.
CLIENTS_DIR := tests/compat/python_clients
CLIENTS_VENV := .venv-clients

.PHONY: venv node-deps client-deps run simulate test lint typecheck pytest format clean bench bench-peers bench-fairness bench-continuity rules

venv: $(VENV)/.installed

# Not --quiet: the first install takes a minute or two, and pip's lines show it is working.
$(VENV)/.installed: pyproject.toml setup.py relay/session/_accel.c
	@echo "Installing realtime-relay and its dependencies into $(VENV) (first time only)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[test,deploy,talk]'
	touch $@

node-deps: $(NODE_DEPS)

$(NODE_DEPS): $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error; \
	else \
		echo "npm not found: tests/compat's Node clients will be skipped" >&2; \
	fi

client-deps: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed: $(CLIENTS_DIR)/requirements.txt
	@echo "Installing LiveKit Agents and Pipecat into $(CLIENTS_VENV) for tests/compat..."
	$(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r $(CLIENTS_DIR)/requirements.txt
	touch $@

run: venv
	$(BIN)/relay serve --config $(CONFIG)

simulate: venv
	$(BIN)/relay simulate

lint: venv
	$(BIN)/ruff check relay tests
	$(BIN)/ruff format --check relay tests

format: venv
	$(BIN)/ruff format relay tests
	$(BIN)/ruff check --fix relay tests

typecheck: venv
	$(BIN)/mypy

pytest: venv node-deps client-deps
	$(BIN)/pytest

test: lint typecheck pytest

# The PrometheusRule in the kustomize base, from deploy/prometheus/alerts.yml.
rules:
	$(PYTHON) deploy/prometheus/prometheusrule.py

# Direct vs nginx vs the relay vs picows (and LiteLLM, after `make bench-peers`), on loopback
# (docs/performance.md): about 10 minutes on 2 cores. BENCH_ARGS="--quick" for 3 to 8
# minutes, "--profile" to py-spy the relay under saturation.
bench: venv
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The optional LiteLLM peer path: its own venv, pinned by bench/requirements-litellm.txt.
LITELLM_VENV := bench/.venv-litellm
bench-peers: $(LITELLM_VENV)/.installed

$(LITELLM_VENV)/.installed: bench/requirements-litellm.txt
	@echo "Installing LiteLLM's proxy into $(LITELLM_VENV) for make bench (a few minutes)..."
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install --progress-bar on -r bench/requirements-litellm.txt
	touch $@

# One client floods events, then pings: how far does a healthy session's p99 move?
bench-fairness: venv
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.fairness $(BENCH_ARGS)

# Sessions renewed every few seconds: how long does a client wait at a switch?
bench-continuity: venv
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.continuity $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LITELLM_VENV) $(CLIENTS_VENV) .mypy_cache .pytest_cache .ruff_cache $(NODE_DIR)/node_modules
