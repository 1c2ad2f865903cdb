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

.PHONY: up down logs ps token scale test lint bench clean compose-tool promtool jq-tool chromium unzip-tool

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

test: $(STAMP) compose-tool promtool jq-tool chromium unzip-tool
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

# docker-compose validates compose.yaml in the tests; on Debian as root it is installed here so
# that CI runs that test instead of skipping it.
compose-tool:
	@if ! command -v docker-compose >/dev/null 2>&1 \
	    && [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing docker-compose (apt-get)" >&2; \
	  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends docker-compose >&2; \
	fi

# Info-ZIP's `unzip -t` checks the batch archives in the tests, beside Python's zipfile.
unzip-tool:
	@if ! command -v unzip >/dev/null 2>&1 \
	    && [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing unzip (apt-get)" >&2; \
	  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends unzip >&2; \
	fi

# jq: ops/keycloak/setup_keycloak.sh reads the realm file with it, and the tests run that script.
jq-tool:
	@if ! command -v jq >/dev/null 2>&1 \
	    && [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing jq (apt-get)" >&2; \
	  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends jq >&2; \
	fi

# promtool checks the Prometheus config and the dashboards' queries in the tests; Debian ships it
# in the `prometheus` package, whose install may start and enable a Prometheus server: the tests
# need only the tool, so the server is stopped and disabled again.
promtool:
	@if ! command -v promtool >/dev/null 2>&1 \
	    && [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing promtool (apt-get prometheus)" >&2; \
	  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus >&2; \
	  if [ -d /run/systemd/system ]; then \
	    systemctl disable --now prometheus >&2 || true; \
	  else \
	    service prometheus stop >&2 || true; update-rc.d prometheus disable >&2 || true; \
	  fi; \
	fi

# The console's browser tests drive Debian's Chromium through its chromedriver (Selenium is told
# where both are, so nothing is downloaded at test time).
chromium:
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } \
	    && [ -f /etc/debian_version ] && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium and chromium-driver (apt-get)" >&2; \
	  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends chromium chromium-driver >&2; \
	fi
