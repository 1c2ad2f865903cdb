"""One image cannot take others down with it, through a real worker node (consumer, batches,
CPU pool): an image that kills its CPU process, or one that renders forever, fails alone, in its
own batch and in any other batch in flight, and the node goes on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import Settings
from common.renditions import parse_renditions
from engine.batch import CRASH_REASON
from tests.support import (
    CRASH_MARKER,
    HANG_MARKER,
    PendingJobs,
    StackProbe,
    jpeg,
    paused,
    running_node,
    tall_strip_png,
    wait_for,
)

# The README's example: a gray PNG and a colour WebP thumbnail.
WEBP_THUMB_RENDITIONS = parse_renditions("default:800:gray:png, thumb:200:color:webp:80")

pytestmark = pytest.mark.slow


@pytest.fixture
def jobs(private_queue: Settings, user_id: str) -> Iterator[PendingJobs]:
    made = PendingJobs(private_queue, user_id)
    yield made
    made.close()


def statuses(probe: StackProbe, owner: str) -> dict[uuid.UUID, tuple[str, str | None]]:
    return {row[0]: (row[1], row[2]) for row in probe.rows_for(owner)}


def terminal(probe: StackProbe, owner: str, image_ids: list[uuid.UUID]) -> bool:
    now = statuses(probe, owner)
    return all(now[i][0] in ("completed", "failed") for i in image_ids)


def test_an_image_that_kills_its_process_on_every_try_fails_alone_across_two_batches_in_flight(
    private_queue: Settings, jobs: PendingJobs, probe: StackProbe, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    held = jobs.pending(paused(jpeg(900, 600, seed=9), gate))
    poison_a = jobs.pending(CRASH_MARKER + jpeg(900, 600, seed=1))
    batch_a = [held, poison_a, jobs.pending(jpeg(900, 600, seed=2))]
    poison_b = jobs.pending(CRASH_MARKER + jpeg(900, 600, seed=3))
    batch_b = [poison_b, *(jobs.pending(jpeg(900, 600, seed=s)) for s in (4, 5, 6))]

    with running_node(private_queue, tmp_path, max_render_seconds=600.0) as node:
        jobs.publish(batch_a)
        wait_for(lambda: (gate / "started").exists(), timeout=60, what="batch A's held render")
        jobs.publish(batch_b)
        # Batch B ends, its poison image crashing two processes, while A still holds a render.
        wait_for(lambda: terminal(probe, jobs.owner, batch_b), timeout=120, what="batch B")
        assert not terminal(probe, jobs.owner, batch_a)
        (gate / "release").touch()
        wait_for(lambda: terminal(probe, jobs.owner, batch_a), timeout=120, what="batch A")
        assert len(node.pool.pids()) == 2  # every dead process was replaced

    outcome = statuses(probe, jobs.owner)
    assert outcome.pop(poison_a) == ("failed", CRASH_REASON)
    assert outcome.pop(poison_b) == ("failed", CRASH_REASON)
    assert set(outcome.values()) == {("completed", None)} and len(outcome) == 5
    results = probe.results()
    assert {i for i in outcome if f"results/{i}.png" in results} == set(outcome)
    assert not any(str(p) in key for p in (poison_a, poison_b) for key in results)
    # The held render ran once: the crashes around it never touched its process.
    assert (gate / "started").read_text().count("\n") == 1


def test_a_render_past_max_render_seconds_fails_that_image_and_the_node_goes_on(
    private_queue: Settings, jobs: PendingJobs, probe: StackProbe, tmp_path: Path
) -> None:
    endless = jobs.pending(HANG_MARKER + jpeg(900, 600, seed=1))
    batch = [endless, jobs.pending(jpeg(900, 600, seed=2)), jobs.pending(jpeg(900, 600, seed=3))]

    with running_node(private_queue, tmp_path, max_render_seconds=2.0) as node:
        jobs.publish(batch)
        wait_for(lambda: terminal(probe, jobs.owner, batch), timeout=120, what="the batch")
        later = jobs.pending(jpeg(900, 600, seed=4))
        jobs.publish([later])
        wait_for(lambda: terminal(probe, jobs.owner, [later]), timeout=60, what="a later image")
        assert len(node.pool.pids()) == 2

    outcome = statuses(probe, jobs.owner)
    assert outcome.pop(endless) == ("failed", "took longer than 2 s to render")
    assert set(outcome.values()) == {("completed", None)} and len(outcome) == 3
    assert not any(str(endless) in key for key in probe.results())


def test_an_image_whose_webp_thumb_cannot_be_made_fails_alone_and_another_users_images_complete(
    private_queue: Settings, jobs: PendingJobs, probe: StackProbe, tmp_path: Path
) -> None:
    # Accepted before the deployment named the WebP rendition: the engine meets it.
    hostile_owner = PendingJobs(private_queue, f"{jobs.owner}-hostile")
    try:
        hostile = [hostile_owner.pending(tall_strip_png()) for _ in range(2)]
        ordinary = [jobs.pending(jpeg(900, 600, seed=s)) for s in range(1, 7)]
        with running_node(private_queue, tmp_path, renditions=WEBP_THUMB_RENDITIONS) as node:
            # One publish: the images arrive together and share batches.
            jobs.publish([ordinary[0], hostile[0], *ordinary[1:4], hostile[1], *ordinary[4:]])
            wait_for(
                lambda: (
                    terminal(probe, jobs.owner, ordinary)
                    and terminal(probe, hostile_owner.owner, hostile)
                ),
                timeout=120,
                what="every image",
            )
            assert len(node.pool.pids()) == 2
        for image_id in hostile:
            status, error = statuses(probe, hostile_owner.owner)[image_id]
            assert status == "failed"
            assert "'thumb' rendition would be 200x20000 pixels" in (error or "")
            assert not any(str(image_id) in key for key in probe.results())
        assert set(statuses(probe, jobs.owner).values()) == {("completed", None)}
        # Claimed once each: no batch was requeued, so the node never paused on them.
        assert [probe.attempts(i) for i in (*hostile, *ordinary)] == [1] * 8
    finally:
        hostile_owner.close()
