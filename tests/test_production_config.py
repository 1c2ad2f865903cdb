"""A production process refuses to start with a development secret and names the variable; the
local stack and the tests declare themselves local (PIXELMILL_ENV=local) to use them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.config import ConfigError, Settings, declare_local
from ops.issuer_flows import CONSOLE_REDIRECT_URIS
from ops.keycloak_server import (
    BUILD_OPTIONS,
    DEMO_FILE,
    DEMO_USERS_SCRIPT,
    KEYCLOAK_VERSION,
    REALM_FILE,
    START_ARGS,
)
from tests.support import COMPOSE_SECRETS, free_port

ROOT = Path(__file__).resolve().parent.parent

# What an operator who changed every secret passes: the baseline each test spoils one way.
PRODUCTION_ENV = {
    "POSTGRES_URL": "postgresql://pixelmill:Vq9w-pg-2f1@postgres:5432/pixelmill",
    "REDIS_URL": "rediss://:Lr3k-redis-77a@redis:6380/0",
    "RABBITMQ_URL": "amqps://pixelmill:Tz8s-mq-0c4@rabbitmq:5671/%2F",
    "MINIO_ENDPOINT": "minio:9000",
    "MINIO_ACCESS_KEY": "pixelmill-app",
    "MINIO_SECRET_KEY": "Kd7x-app-5e9",
    "MINIO_PRESIGN_ACCESS_KEY": "pixelmill-results-reader",
    "MINIO_PRESIGN_SECRET_KEY": "Hn2p-reader-3b8",
    "WEBHOOK_ENCRYPTION_KEY": "Wq4e-webhooks-9d2c-7a51e0",
}


def test_production_settings_with_their_own_secrets_are_accepted() -> None:
    settings = Settings.from_env(PRODUCTION_ENV)

    assert not settings.is_local
    assert settings.storage.presign_access_key == "pixelmill-results-reader"
    assert settings.storage.presign_secret_key == "Hn2p-reader-3b8"
    assert settings.storage.access_key == "pixelmill-app"


def test_production_is_the_default_so_an_empty_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match="MINIO_ACCESS_KEY is not set"):
        Settings.from_env({})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MINIO_ACCESS_KEY", "pixelmill"),
        ("MINIO_SECRET_KEY", "pixelmill-secret"),
        ("MINIO_SECRET_KEY", "minioadmin"),
        ("RABBITMQ_URL", "amqp://guest:guest@rabbitmq:5672/%2F"),
        ("RABBITMQ_URL", "amqp://pixelmill:pixelmill@rabbitmq:5672/%2F"),
        ("POSTGRES_URL", "postgresql://pixelmill:pixelmill@postgres:5432/pixelmill"),
        ("REDIS_URL", "redis://:CHANGE-ME@redis:6379/0"),
        ("MINIO_PRESIGN_SECRET_KEY", "pixelmill-secret"),
    ],
)
def test_production_refuses_a_well_known_secret_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable) as refused:
        Settings.from_env({**PRODUCTION_ENV, variable: value})

    assert "PIXELMILL_ENV=local" in str(refused.value)
    assert value not in str(refused.value), "the message must not repeat the secret"


@pytest.mark.parametrize(
    "variable",
    ["MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "POSTGRES_URL", "RABBITMQ_URL", "REDIS_URL"],
)
def test_production_refuses_an_unset_secret_whose_default_is_a_development_one(
    variable: str,
) -> None:
    environ = {name: value for name, value in PRODUCTION_ENV.items() if name != variable}

    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(environ)


def test_production_refuses_a_secret_file_holding_a_development_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "minio-secret"
    secret_file.write_text("pixelmill-secret\n")
    environ = {name: v for name, v in PRODUCTION_ENV.items() if name != "MINIO_SECRET_KEY"}

    with pytest.raises(ConfigError, match="MINIO_SECRET_KEY"):
        Settings.from_env({**environ, "MINIO_SECRET_KEY_FILE": str(secret_file)})


def test_production_refuses_redis_without_a_password() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL has no password"):
        Settings.from_env({**PRODUCTION_ENV, "REDIS_URL": "redis://redis:6379/0"})


def test_production_refuses_download_urls_signed_with_the_main_key() -> None:
    environ = {name: v for name, v in PRODUCTION_ENV.items() if not name.startswith("MINIO_PRE")}
    with pytest.raises(ConfigError, match="MINIO_PRESIGN_ACCESS_KEY is not set"):
        Settings.from_env(environ)

    shared = {**PRODUCTION_ENV, "MINIO_PRESIGN_ACCESS_KEY": PRODUCTION_ENV["MINIO_ACCESS_KEY"]}
    with pytest.raises(ConfigError, match="MINIO_PRESIGN_ACCESS_KEY equals MINIO_ACCESS_KEY"):
        Settings.from_env(shared)


def test_local_mode_keeps_the_development_defaults_and_presigns_with_the_main_key() -> None:
    settings = Settings.from_env({"PIXELMILL_ENV": "local"})

    assert settings.is_local
    assert settings.storage.secret_key == "pixelmill-secret"
    assert settings.queue.url.startswith("amqp://guest:guest@")
    assert settings.storage.presign_access_key == settings.storage.access_key
    assert settings.storage.presign_secret_key == settings.storage.secret_key


def test_environment_names_are_checked_not_guessed() -> None:
    with pytest.raises(ConfigError, match="PIXELMILL_ENV"):
        Settings.from_env({**PRODUCTION_ENV, "PIXELMILL_ENV": "dev"})


def test_declare_local_keeps_an_explicit_production_choice() -> None:
    assert declare_local({})["PIXELMILL_ENV"] == "local"
    assert declare_local({"PIXELMILL_ENV": "production"})["PIXELMILL_ENV"] == "production"
    with pytest.raises(ConfigError, match="MINIO_ACCESS_KEY"):
        Settings.from_env(declare_local({"PIXELMILL_ENV": "production"}))


def _without_pixelmill_settings() -> dict[str, str]:
    """The test runner's environment minus anything that could configure pixelmill."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")
    return {name: os.environ[name] for name in keep if name in os.environ}


@pytest.mark.parametrize("command", [["ingest.serve", "--bind"], ["engine"]])
def test_api_and_worker_refuse_to_start_with_a_default_secret(command: list[str]) -> None:
    argv = [sys.executable, "-m", *command]
    if command[-1] == "--bind":
        argv.append(f"127.0.0.1:{free_port()}")
    environ = {
        **_without_pixelmill_settings(),
        **PRODUCTION_ENV,
        "MINIO_SECRET_KEY": "pixelmill-secret",
    }

    started = subprocess.run(
        argv, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60, check=False
    )

    assert started.returncode == 2, started.stderr
    assert "MINIO_SECRET_KEY" in started.stderr
    assert "pixelmill-secret" not in started.stderr


# --- compose: the production stack ------------------------------------------------------------
# Docker cannot run here: compose.yaml is checked through `docker-compose config` (installed by
# `make test-tools`) and the files it mounts, the application's part through Settings.

COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
KEYCLOAK = ROOT / "ops" / "keycloak"


def _compose(*args: str, secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    environ = {name: value for name, value in os.environ.items() if name not in COMPOSE_SECRETS}
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "compose.yaml"), *args, "config"],
        capture_output=True,
        text=True,
        check=False,
        env={**environ, **secrets},
        cwd=ROOT,
    )


def _compose_services(secrets: dict[str, str] = COMPOSE_SECRETS) -> dict[str, Any]:
    result = _compose(secrets=secrets)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"])


@needs_compose
@pytest.mark.parametrize("variable", sorted(COMPOSE_SECRETS))
def test_compose_refuses_to_start_without_a_secret_and_names_it(variable: str) -> None:
    missing = {name: value for name, value in COMPOSE_SECRETS.items() if name != variable}

    result = _compose(secrets=missing)

    assert result.returncode != 0
    assert f"set {variable}" in result.stderr


@needs_compose
def test_compose_application_environment_passes_the_production_check() -> None:
    services = _compose_services()
    for name in ("api", "worker", "migrate"):
        environment = services[name]["environment"]
        settings = Settings.from_env(environment)

        assert not settings.is_local, name
        assert settings.storage.presign_access_key != settings.storage.access_key
        assert settings.storage.access_key != COMPOSE_SECRETS["MINIO_ROOT_USER"]


@needs_compose
def test_compose_with_a_development_secret_gets_a_process_that_refuses_to_start() -> None:
    weak = {**COMPOSE_SECRETS, "MINIO_APP_SECRET_KEY": "pixelmill-secret"}
    environment = _compose_services(weak)["api"]["environment"]

    with pytest.raises(ConfigError, match="MINIO_SECRET_KEY"):
        Settings.from_env(environment)


def _published_on_all_interfaces(service: dict[str, Any]) -> list[int]:
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("host_ip") in (None, "", "0.0.0.0"):
                published.append(int(port["published"]))
        elif not str(port).startswith("127.0.0.1:"):
            published.append(int(str(port).split(":")[-2]))
    return published


@needs_compose
def test_compose_publishes_only_the_api_and_s3_downloads_beyond_this_host() -> None:
    services = _compose_services()

    public = {name: _published_on_all_interfaces(s) for name, s in services.items()}

    assert {name: ports for name, ports in public.items() if ports} == {
        "api": [3000],
        "minio": [9000],
    }


@needs_compose
def test_compose_minio_signs_downloads_with_a_reader_of_results_only() -> None:
    services = _compose_services()
    buckets = services["buckets"]
    mounted = dict(volume.split(":")[:2][::-1] for volume in buckets["volumes"])
    policies = Path(mounted["/opt/pixelmill/minio"])
    reader = json.loads((policies / "results-reader-policy.json").read_text())
    app = json.loads((policies / "app-policy.json").read_text())
    api = services["api"]["environment"]

    assert services["minio"]["environment"]["MINIO_ROOT_USER"] == COMPOSE_SECRETS["MINIO_ROOT_USER"]
    assert buckets["environment"]["MINIO_PRESIGN_ACCESS_KEY"] == api["MINIO_PRESIGN_ACCESS_KEY"]
    assert buckets["environment"]["MINIO_ACCESS_KEY"] == api["MINIO_ACCESS_KEY"]
    assert buckets["entrypoint"][-1].startswith("/opt/pixelmill/minio/")
    assert reader["Statement"] == [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{api['MINIO_PROCESSED_BUCKET']}/*"],
        }
    ]
    app_actions = {action for statement in app["Statement"] for action in statement["Action"]}
    assert not any(action.startswith("admin:") or action == "s3:*" for action in app_actions)


@needs_compose
def test_compose_keycloak_runs_in_production_mode_with_demo_users_only_in_dev() -> None:
    services = _compose_services()
    keycloak, demo = services["keycloak"], services["keycloak-demo-users"]
    realm = json.loads((KEYCLOAK / "realm-ImageProcessor.json").read_text())
    demo_file = json.loads((KEYCLOAK / "demo-ImageProcessor.json").read_text())

    assert keycloak["command"][0] == "start" and "start-dev" not in keycloak["command"]
    assert keycloak["environment"]["KC_DB"] == "postgres"
    password = keycloak["environment"]["KC_BOOTSTRAP_ADMIN_PASSWORD"]
    assert password == COMPOSE_SECRETS["KEYCLOAK_ADMIN_PASSWORD"]
    assert "users" not in realm
    assert not any(client["directAccessGrantsEnabled"] for client in realm["clients"])
    assert "profiles" not in keycloak
    assert demo["profiles"] == ["dev"]
    assert {user["username"] for user in demo_file["users"]} == {"user", "admin"}
    assert all(user["attributes"]["demo_only"] == ["true"] for user in demo_file["users"])


@needs_compose
def test_compose_keycloak_is_the_version_command_database_and_realm_the_tests_prove() -> None:
    services = _compose_services()
    keycloak, demo = services["keycloak"], services["keycloak-demo-users"]
    major_minor = ".".join(KEYCLOAK_VERSION.split(".")[:2])
    environment = keycloak["environment"]
    mounted = dict(volume.split(":")[:2][::-1] for volume in keycloak["volumes"])
    demo_mounted = dict(volume.split(":")[:2][::-1] for volume in demo["volumes"])

    assert keycloak["image"] == demo["image"] == f"quay.io/keycloak/keycloak:{major_minor}"
    # The tests' server is built ahead (`kc.sh build`), so it starts --optimized.
    assert keycloak["command"] == [arg for arg in START_ARGS if arg != "--optimized"]
    assert environment["KC_DB"] == "postgres"
    assert environment["KC_DB_URL"] == "jdbc:postgresql://postgres:5432/keycloak"
    assert {"KC_DB_USERNAME", "KC_DB_PASSWORD"} <= set(environment)
    assert f"--health-enabled={environment['KC_HEALTH_ENABLED']}" in BUILD_OPTIONS
    assert Path(mounted["/opt/keycloak/data/import/realm-ImageProcessor.json"]) == REALM_FILE
    assert Path(demo_mounted["/opt/pixelmill/demo_users.sh"]) == DEMO_USERS_SCRIPT
    assert Path(demo_mounted["/opt/pixelmill/demo-ImageProcessor.json"]) == DEMO_FILE


def test_realm_clients_allow_only_browser_logins_with_pkce() -> None:
    clients = json.loads((KEYCLOAK / "realm-ImageProcessor.json").read_text())["clients"]
    api, console = clients

    for client in clients:
        assert client["publicClient"] and client["standardFlowEnabled"]
        assert not client["directAccessGrantsEnabled"] and not client["implicitFlowEnabled"]
        assert client["attributes"]["pkce.code.challenge.method"] == "S256"
        [mapper] = client["protocolMappers"]
        assert mapper["config"]["included.client.audience"] == "api-gateway-client"
    assert api["redirectUris"] == []  # each deployment adds its own
    # The console's callback on the API that `make up` serves; another deployment adds its own.
    assert console["clientId"] == "pixelmill-console"
    assert console["redirectUris"] == list(CONSOLE_REDIRECT_URIS)


@pytest.mark.parametrize("value", [None, "pixelmill-local-webhook-key"])
def test_production_refuses_to_start_without_its_own_webhook_encryption_key(
    value: str | None,
) -> None:
    environ = {k: v for k, v in PRODUCTION_ENV.items() if k != "WEBHOOK_ENCRYPTION_KEY"}
    if value is not None:
        environ["WEBHOOK_ENCRYPTION_KEY"] = value
    with pytest.raises(ConfigError, match="WEBHOOK_ENCRYPTION_KEY"):
        Settings.from_env(environ)
