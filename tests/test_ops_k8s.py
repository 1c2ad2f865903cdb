"""Deployment files: the Kubernetes manifests, the Prometheus and Grafana set-up and the compose
`monitoring` profile.

Kubernetes cannot run here. Built-in kinds are validated against the Kubernetes JSON schemas
shipped in the `kubernetes-validate` package (strict: unknown fields fail); the checks below add
what a schema cannot see: selectors that match pod labels, probes on declared ports, config
and secret names that exist, values the application accepts, and KEDA's ScaledObject wiring.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.broker import job_queues
from common.config import ConfigError, Settings
from ops.__main__ import COMMANDS
from tests.support import COMPOSE_SECRETS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "ops" / "k8s"
KUBERNETES_VERSION = "1.30"
MIB = 1024 * 1024

# Metric names agreed with the engine and the API (the dashboard must show each of them).
CONTRACT_METRICS = {
    "pixelmill_http_requests_total",
    "pixelmill_http_request_seconds_bucket",
    "pixelmill_upload_bytes_total",
    "pixelmill_engine_stage_seconds_bucket",
    "pixelmill_engine_batch_size_bucket",
    "pixelmill_engine_images_total",
    "pixelmill_engine_failures_total",
    "pixelmill_engine_queue_depth",
    "pixelmill_engine_lane_depth",
    "pixelmill_engine_slots_in_use",
    "pixelmill_engine_processes",
}


# --- loading ------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in _manifest_files():
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _workloads() -> Iterator[dict[str, Any]]:
    return (d for d in _documents() if d["kind"] in ("Deployment", "Job"))


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _container(kind: str, name: str) -> dict[str, Any]:
    [container] = _containers(_one(kind, name))
    return container


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "": 1}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * units[unit or ""]


def _cpu(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _env(container: dict[str, Any]) -> dict[str, str]:
    """What the container sees: its ConfigMap and Secret (envFrom) overlaid by its own env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(_one("Secret", source["secretRef"]["name"])["stringData"])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


def _filled(env: dict[str, str]) -> dict[str, str]:
    """`env` as an operator fills it in: each placeholder replaced by a secret of its own."""
    return {
        name: value.replace("CHANGE-ME", f"s3cr3t-{name.lower()}") for name, value in env.items()
    }


# --- Kubernetes: schemas and kustomize ----------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [d for d in _documents() if not d["apiVersion"].startswith("keda.sh/")],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())

    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]
    assert kustomization["namespace"] == _one("Namespace", "pixelmill")["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_folder() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {
        "pixelmill"
    }


# --- Kubernetes: wiring a schema cannot see -----------------------------------------------------


def test_every_selector_matches_the_pod_labels_it_should() -> None:
    deployments = [d for d in _documents() if d["kind"] == "Deployment"]
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    for service in (d for d in _documents() if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        matching = [
            d
            for d in deployments
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in _containers(matching[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_env_sources_exist_and_the_application_accepts_every_value() -> None:
    for workload in _workloads():
        for container in _containers(workload):
            env = _filled(_env(container))
            settings = Settings.from_env(env)
            assert not settings.is_local
            assert settings.queue.queue == env["RABBITMQ_QUEUE"]


def test_workloads_run_commands_the_image_installs_as_the_image_user() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"--uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == uid
        for container in pod["containers"]:
            assert container["command"][0] in scripts
            assert container["resources"]["limits"] and container["resources"]["requests"]


def test_api_probes_health_for_liveness_and_ready_for_readiness() -> None:
    api = _container("Deployment", "pixelmill-api")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}

    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] in ports
    assert api["command"][-1].endswith(f":{ports['http']}")


def test_worker_publishes_only_metrics_and_probes_with_an_existing_ops_command() -> None:
    worker = _container("Deployment", "pixelmill-worker")

    assert [(p["name"], p["containerPort"]) for p in worker["ports"]] == [("metrics", 9102)]
    assert str(worker["ports"][0]["containerPort"]) == _env(worker)["METRICS_PORT"]
    for probe in ("livenessProbe", "startupProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "ops"] and command[3] in COMMANDS


def test_worker_shared_memory_and_cpu_fit_its_settings_and_limits() -> None:
    deployment = _one("Deployment", "pixelmill-worker")
    worker = _container("Deployment", "pixelmill-worker")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    [shm] = [m for m in worker["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    shm_volume = volumes[shm["name"]]["emptyDir"]
    settings = Settings.from_env(_filled(_env(worker)))
    shm_bytes = _quantity_bytes(shm_volume["sizeLimit"])

    assert shm_volume["medium"] == "Memory"
    assert settings.engine.memory_mb * MIB <= shm_bytes
    assert _quantity_bytes(worker["resources"]["limits"]["memory"]) >= shm_bytes + 512 * MIB
    assert settings.engine.processes <= _cpu(worker["resources"]["limits"]["cpu"])
    # KEDA owns the replica count; a `replicas` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]


def test_scaled_object_scales_the_worker_on_the_length_of_every_job_queue() -> None:
    scaled = _one("ScaledObject", "pixelmill-worker")
    target = scaled["spec"]["scaleTargetRef"]
    triggers = scaled["spec"]["triggers"]
    worker_env = _env(_container("Deployment", "pixelmill-worker"))
    queue = Settings.from_env(_filled(worker_env)).queue

    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert (target["kind"], target["name"]) == ("Deployment", "pixelmill-worker")
    _one("Deployment", target["name"])
    # One trigger per lane, bulk shard and the base queue: no backlog goes unseen.
    assert sorted(t["metadata"]["queueName"] for t in triggers) == sorted(
        q.name for q in job_queues(queue)
    )
    for trigger in triggers:
        auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        [secret_ref] = auth["spec"]["secretTargetRef"]
        assert auth["apiVersion"] == "keda.sh/v1alpha1"
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert float(trigger["metadata"]["value"]) > 0
        assert secret_ref["parameter"] == "host"
        assert secret_ref["key"] in _one("Secret", secret_ref["name"])["stringData"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_secret_holds_placeholders_only() -> None:
    secret = _one("Secret", "pixelmill-secrets")["stringData"]

    assert all("CHANGE-ME" in value for value in secret.values())


def test_workloads_refuse_to_start_until_every_placeholder_is_replaced() -> None:
    secret = _one("Secret", "pixelmill-secrets")["stringData"]
    for workload in _workloads():
        for container in _containers(workload):
            env = _env(container)
            assert env["PIXELMILL_ENV"] == "production"
            with pytest.raises(ConfigError, match="MINIO_ACCESS_KEY"):
                Settings.from_env(env)
            for name in secret:
                # Only this one still a placeholder: its own name is what stops the start.
                one_left = {**_filled(env), name: env[name]}
                with pytest.raises(ConfigError, match=name):
                    Settings.from_env(one_left)


def test_migrate_job_runs_the_migrations_once() -> None:
    job = _one("Job", "pixelmill-migrate")

    assert _container("Job", "pixelmill-migrate")["command"] == ["pixelmill-migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


# --- Prometheus and Grafana ---------------------------------------------------------------------


def _prometheus() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text()))


def _dashboard() -> dict[str, Any]:
    return dict(
        json.loads((ROOT / "ops" / "grafana" / "dashboards" / "pixelmill.json").read_text())
    )


def _queries() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_prometheus_scrapes_the_api_and_every_worker_by_dns() -> None:
    jobs = {job["job_name"]: job for job in _prometheus()["scrape_configs"]}
    api, worker = jobs["pixelmill-api"], jobs["pixelmill-worker"]

    assert api["metrics_path"] == "/metrics"
    assert api["static_configs"] == [{"targets": ["api:3000"]}]
    [dns] = worker["dns_sd_configs"]
    assert (dns["names"], dns["type"], dns["port"]) == (["worker"], "A", 9102)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(ROOT / "ops" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, expr in enumerate(_queries())
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = subprocess.run(
        ["promtool", "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_dashboard_shows_every_agreed_metric() -> None:
    used = {name for expr in _queries() for name in re.findall(r"pixelmill_\w+", expr)}

    assert used == CONTRACT_METRICS


def test_dashboard_queries_are_well_formed() -> None:
    for expr in _queries():
        depth = 0
        for char in expr:
            depth += {"(": 1, ")": -1}.get(char, 0)
            assert depth >= 0, expr
        assert depth == 0, expr
        if "histogram_quantile" in expr:
            assert re.search(r"by \([^)]*\ble\b", expr), f"quantile without `le`: {expr}"
            assert "_bucket[" in expr, expr


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    provisioning = ROOT / "ops" / "grafana" / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    [variable] = dashboard["templating"]["list"]
    ids = [p["id"] for p in dashboard["panels"]]

    assert (variable["type"], variable["query"]) == ("datasource", source["type"])
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


# --- compose: the monitoring profile ------------------------------------------------------------

COMPOSE = shutil.which("docker-compose")


def _compose_config(*profile: str) -> dict[str, Any]:
    assert COMPOSE is not None
    command = [COMPOSE, "-f", str(ROOT / "compose.yaml"), *profile, "config"]
    environ = {**os.environ, **COMPOSE_SECRETS}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environ)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of a service's bind mounts (short or long syntax)."""
    mounts = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        if source.startswith("/"):
            mounts[target] = source
    return mounts


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
def test_compose_monitoring_profile_runs_prometheus_and_grafana_from_the_repository() -> None:
    services = _compose_config("--profile", "monitoring")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    provider = yaml.safe_load(
        (ROOT / "ops" / "grafana" / "provisioning" / "dashboards" / "pixelmill.yaml").read_text()
    )["providers"][0]

    for service in (prometheus, grafana):
        assert service["profiles"] == ["monitoring"]
        assert all(Path(source).exists() for source in _bind_mounts(service).values())
    assert _bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(
        ROOT / "ops" / "prometheus" / "prometheus.yml"
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana_mounts = _bind_mounts(grafana)
    assert grafana_mounts["/etc/grafana/provisioning"] == str(
        ROOT / "ops" / "grafana" / "provisioning"
    )
    assert grafana_mounts[provider["options"]["path"]] == str(
        ROOT / "ops" / "grafana" / "dashboards"
    )


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed")
def test_compose_default_services_are_outside_the_monitoring_profile() -> None:
    services = _compose_config()["services"]
    scraped = {"api", "worker"}

    assert scraped <= set(services)
    assert all("profiles" not in services[name] for name in scraped)
    assert "ports" not in services["worker"]
    assert shlex.split(" ".join(services["api"]["command"]))[-1].endswith(":3000")
