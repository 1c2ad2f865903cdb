"""`python -m bench soak` in small: unique images from one template, tenths by completion order,
and a short run through the real API, worker node and client producing every reading."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from bench.report import plots_for, soak_summary_markdown
from bench.results import build_document
from bench.soak import SoakConfig, Tenth, base_jpeg, rate_verdict, run_soak, tenths, unique_jpeg
from tests.support import ROOT, served_api


def test_soak_images_show_the_same_picture_with_distinct_bytes() -> None:
    template = base_jpeg(160, 120)
    first, second = unique_jpeg(template, 1), unique_jpeg(template, 2)
    assert hashlib.sha256(first).digest() != hashlib.sha256(second).digest()
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in (first, second)]
    original = cv2.imdecode(np.frombuffer(template, np.uint8), cv2.IMREAD_COLOR)
    assert all(np.array_equal(d, original) for d in decoded)
    with pytest.raises(ValueError):
        unique_jpeg(b"\x89PNG", 1)


def test_tenths_follow_completion_order_and_judge_only_those_after_the_uploads() -> None:
    # 100 images: the first 50 while uploading (1 per second), then 2 per second, then 1.
    done = [float(i + 1) for i in range(50)]
    done += [50 + (i + 1) / 2 for i in range(30)]
    done += [65 + (i + 1) for i in range(20)]
    slices = tenths(list(reversed(done)), run_started=0.0, uploads_ended=50.0)

    assert [t.images for t in slices] == [10] * 10
    assert [t.after_uploads for t in slices] == [False] * 5 + [True] * 5
    assert slices[5].per_second == pytest.approx(2.0)
    assert slices[9].per_second == pytest.approx(1.0)
    verdict = rate_verdict(slices)
    assert (verdict["ratio"], verdict["meets_target"]) == (0.5, False)
    assert rate_verdict([Tenth(1, 5, 0.0, 1.0, True)])["meets_target"] is None


@pytest.mark.slow
def test_a_small_soak_reports_every_reading_and_renders(
    env: dict[str, str], settings: Any, worker: Any, issuer: Any, tmp_path: Path
) -> None:
    with served_api(env, tmp_path / "api.log") as (url, _):
        config = SoakConfig(
            url=url,
            token=issuer.mint_token("soak-test", ("user",), expires_in=900),
            settings=settings,
            state_dir=tmp_path / "no-stack",
            work_dir=tmp_path / "work",
            count=40,
            warmup=20,
            concurrency=2,
            batch_size=8,
            samples=5,
            sample_interval_s=0.2,
            settle_s=0.0,
        )
        payload = run_soak(config)

    assert (payload["completed"], payload["failed"], payload["rejected"]) == (40, 0, 0)
    assert [t["images"] for t in payload["tenths"]] == [4] * 10
    for side in ("idle_before", "idle_after"):
        assert set(payload[side]["p99_ms"]) == {"get_batch", "get_image", "list_deepest_page"}
        assert all(v > 0 for v in payload[side]["p99_ms"].values())
        assert payload[side]["tables"]["images"]["index_bytes"] > 0
        assert payload[side]["redis_used_memory_bytes"] > 0
    assert payload["expected_seconds"] > 0
    assert not (config.work_dir).exists() or not any(config.work_dir.rglob("*.jpg"))

    document = build_document("soak", config.summary(), payload, ROOT)
    markdown = soak_summary_markdown(document)
    assert "| 10 | 4 |" in markdown and "Idle GET p99" in markdown
    [plot] = plots_for(document, tmp_path, "soak")
    assert plot.stat().st_size > 0
