# Every target first makes sure .venv holds the project (re-installed when pyproject.toml changes).

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pixelmill-installed

# `make token USER=alice ROLES=user,admin`. USER from the environment is the login name, not a
# token subject, so only a command-line USER counts.
ifeq ($(origin USER),command line)
TOKEN_USER := $(USER)
else
TOKEN_USER := user
endif
ROLES ?= user
# `make up KEYCLOAK=1`: the real Keycloak on :8080 instead of the local issuer.
KEYCLOAK ?=
BENCH_PROFILE ?= quick
# Every target runs against the local stack, whose secrets are the development ones.
export PIXELMILL_ENV ?= local
# Batch webhooks may call receivers on this machine (refused in production).
export WEBHOOK_ALLOW_PRIVATE ?= true

.PHONY: up down logs ps token scale test lint bench clean test-tools

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV) >&2
	@echo "installing pixelmill into $(VENV)" >&2
	@$(PY) -m pip install -q -e '.[test,bench]' >&2
	@touch $@

up: $(STAMP)
	$(PY) -m ops up $(if $(filter 1 true yes,$(KEYCLOAK)),--keycloak)

down: $(STAMP)
	$(PY) -m ops down

logs: $(STAMP)
	$(PY) -m ops logs

ps: $(STAMP)
	$(PY) -m ops ps

# Prints only the token: TOKEN=$$(make -s token)
token: $(STAMP)
	@$(PY) -m ops token --user '$(TOKEN_USER)' --roles '$(ROLES)'

# `make scale N=4`: every worker node resizes its CPU pool within 2 s.
scale: $(STAMP)
	$(PY) -m ops scale --processes '$(N)'

test: $(STAMP) test-tools
	$(PY) -m ops services --test-database
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench $(BENCH_PROFILE)

# Stops the local stack first: its data lives in .state.
clean: $(STAMP)
	$(PY) -m ops down
	rm -rf .state .pytest_cache .mypy_cache .ruff_cache build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# The programs some tests call (docker-compose, promtool, jq, unzip, chromium and chromedriver;
# ops/test_tools.py says why each), installed in one apt-get run on Debian as root, as in CI, so
# those tests run instead of skipping.
test-tools: $(STAMP)
	@$(PY) -m ops test-tools
