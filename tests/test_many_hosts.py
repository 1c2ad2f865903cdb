"""Three worker nodes as three hosts (own hostname, own PID namespace with the node as PID 1, own
`/dev/shm`) drain one backlog; one is SIGKILLed mid-batch and started again on the same host.

Where node identity (host:pid, and every node is PID 1), heartbeats and shared-memory sweeping
could go wrong, this proves they do not: every image ends completed exactly once, the killed
node's segments are swept by its successor, and `ops status` tells the three hosts apart."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.broker import queue_depth
from common.config import Settings
from ops.issuer import LocalIssuer
from ops.status import collect_status
from tests.simulated_hosts import ROOT, SimulatedHost, namespaces_unavailable
from tests.support import ApiClient, StackProbe, jpeg, multipart, wait_for

pytestmark = pytest.mark.slow

IMAGES = 240
PER_REQUEST = 20
HOSTNAMES = ("host-a", "host-b", "host-c")
VICTIM = "host-b"
# Every node holds each batch before working on it, so the backlog takes a known least time to
# drain (IMAGES / (4 per 0.5 s * 2 + 4 per 1.5 s), over 13 s) whatever the CPU, and a SIGKILL
# after the victim's first finished batch lands while it holds the next (checked, too).
HOLD_SECONDS = "0.5"
VICTIM_HOLD_SECONDS = "1.5"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[dict[str, SimulatedHost]]:
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"simulated hosts need Linux namespaces: {reason}")
    made = {name: SimulatedHost(name, tmp_path / "hosts") for name in HOSTNAMES}
    yield made
    for host in made.values():
        if host.running:
            host.kill()


@pytest.fixture
def own_api(private_queue: Settings, issuer: LocalIssuer, user_id: str) -> Iterator[ApiClient]:
    """The API on the test's own queue, so only this test's nodes see its jobs."""
    from ingest.app import Dependencies, create_app

    deps = Dependencies.connect(private_queue)
    yield ApiClient(create_app(private_queue, deps), issuer.mint_token(user_id, ("user",)))
    deps.close()


def node_env(env: dict[str, str], settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **env,
        "RABBITMQ_QUEUE": settings.queue.queue,
        "RABBITMQ_DEAD_LETTER_QUEUE": settings.queue.dead_letter_queue,
        "REDIS_PREFIX": settings.redis_prefix,
        "LOG_FORMAT": "json",
        "WORKER_PROCESSES": "1",
        # Small prefetch and batches, so no node takes the whole backlog in its first grab.
        "WORKER_PREFETCH": "8",
        "WORKER_BATCH_SIZE": "4",
        **extra,
    }


def upload_backlog(api: ApiClient) -> list[str]:
    ids: list[str] = []
    for start in range(0, IMAGES, PER_REQUEST):
        files = [
            ("image", f"img-{i}.jpg", jpeg(96, 64, seed=i), "image/jpeg")
            for i in range(start, start + PER_REQUEST)
        ]
        body, content_type = multipart(files)
        response = api.post_raw("/api/v1/uploads", body, content_type)
        assert response.status_code in (201, 207), response.text
        ids += [item["id"] for item in response.json["items"] if item["status"] == 201]
    assert len(ids) == IMAGES
    return ids


def completed_per_host(settings: Settings) -> dict[str, int]:
    return {node.host: node.completed for node in collect_status(settings).nodes}


def completed_events(host: SimulatedHost) -> list[str]:
    """Image ids of the host's per-image `completed` log events (a torn last line is skipped)."""
    ids = []
    for line in host.log().splitlines():
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            continue
        if event.get("status") == "completed" and "image_id" in event:
            ids.append(event["image_id"])
    return ids


def cpu_processes_in_namespace(host: SimulatedHost) -> list[int]:
    """The node's CPU processes (children of its fork server) among its namespace's processes."""
    members = host.namespace_processes()
    servers = [pid for pid in members if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    children = [
        int(child)
        for server in servers
        for child in Path(f"/proc/{server}/task/{server}/children").read_text().split()
    ]
    return [pid for pid in children if pid in members]


def ops_status(env: dict[str, str]) -> dict[str, Any]:
    shown = subprocess.run(
        [sys.executable, "-m", "ops", "status", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def test_three_hosts_share_a_backlog_and_a_killed_one_restarts_cleanly(
    hosts: dict[str, SimulatedHost],
    own_api: ApiClient,
    private_queue: Settings,
    env: dict[str, str],
    probe: StackProbe,
    user_id: str,
) -> None:
    ids = upload_backlog(own_api)
    others_env = node_env(env, private_queue, WORKER_TEST_HOLD_BATCH_SECONDS=HOLD_SECONDS)
    victim_env = node_env(env, private_queue, WORKER_TEST_HOLD_BATCH_SECONDS=VICTIM_HOLD_SECONDS)
    for name, host in hosts.items():
        host.start_node(victim_env if name == VICTIM else others_env)
    victim = hosts[VICTIM]
    assert {host.pid_in_namespace() for host in hosts.values()} == {1}

    # The victim finishes a batch while the queue still has work: it holds the next one.
    wait_for(
        lambda: completed_per_host(private_queue).get(VICTIM, 0) > 0,
        timeout=90,
        what=f"a heartbeat of {VICTIM} with completed images",
    )
    assert queue_depth(private_queue.queue) > 0, "the backlog drained before the kill"
    assert cpu_processes_in_namespace(victim), "the CPU processes live in the host's namespace"

    victim.kill()

    # The whole PID namespace died with its PID 1 (kill waits for that); its arenas survive.
    leftovers = {name for name in victim.segments() if not name.startswith(".")}
    assert leftovers and all(name.startswith("pixelmill-1-") for name in leftovers), leftovers
    victim.start_node(victim_env)
    assert victim.pid_in_namespace() == 1
    wait_for(lambda: not leftovers & victim.segments(), 60, what="the leftover segments swept")
    assert victim.segments(), "the restarted node has arenas of its own"

    status = ops_status(node_env(env, private_queue))
    listed = [(node["host"], node["pid"]) for node in status["nodes"]]
    assert sorted(listed) == [(name, 1) for name in HOSTNAMES], listed

    def all_finished() -> bool:
        return [row[1] for row in probe.rows_for(user_id)] == ["completed"] * IMAGES

    wait_for(
        all_finished,
        120,
        what=lambda: f"every image completed: {Counter(r[1] for r in probe.rows_for(user_id))}",
    )
    for name, host in hosts.items():
        assert host.stop() == 0, f"{name} did not drain on SIGTERM:\n{host.log()[-3000:]}"
        assert not host.namespace_processes()
        assert not host.segments(), f"{name} left shared memory after a clean stop"

    rows = {str(row[0]): row for row in probe.rows_for(user_id)}
    assert sorted(rows) == sorted(ids)
    results = probe.results()
    for image_id in ids:
        assert [key for key in results if image_id in key] == [f"results/{image_id}.png"]
    # Exactly once: at least once is the rows above; no image was committed twice, by any host.
    events = {name: completed_events(host) for name, host in hosts.items()}
    commits = Counter(image_id for found in events.values() for image_id in found)
    assert [image_id for image_id, n in commits.items() if n > 1] == []
    assert set(commits) <= set(ids)
    # The work was shared: each host completed images (the victim before it was killed, too).
    assert all(events[name] for name in HOSTNAMES), {n: len(e) for n, e in events.items()}
