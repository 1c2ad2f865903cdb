"""`python -m ops capacity`: the arithmetic from images a day to a deployment, and the command on
results documents shaped like the benchmark's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from bench.engine_bench import original_bytes_per_image
from ops.__main__ import main as ops_main
from ops.capacity import REFERENCE_COSTS, ImageCosts, Load, Sizes, plan_capacity, render_text
from tests.support import ROOT

COSTS = ImageCosts(
    image_class="test-class",
    node_cpu_s=0.05,
    s3_cpu_s=0.01,
    postgres_cpu_s=0.002,
    rabbitmq_cpu_s=0.0005,
    original_bytes=2_000_000,
    result_bytes=250_000,
    batch_size=16,
    api_images_per_s=20.0,
    source="test",
    api_source="test",
)
# 8.64 million a day is 100 images/s on average.
A_HUNDRED_PER_SECOND = 8_640_000

# --- the arithmetic ----------------------------------------------------------------------------


def test_a_day_of_images_becomes_an_average_rate_and_a_peak_at_the_factor() -> None:
    plan = plan_capacity(A_HUNDRED_PER_SECOND, COSTS, Sizes(peak_factor=2.5))

    assert plan.average_images_per_s == pytest.approx(100)
    assert plan.peak_images_per_s == pytest.approx(250)


def test_workers_and_api_processes_are_sized_for_the_peak() -> None:
    plan = plan_capacity(A_HUNDRED_PER_SECOND, COSTS, Sizes(cores_per_node=4))

    # 300 images/s at 50 ms of node CPU each, on nodes of 4 cores; 20 images/s per API process.
    assert plan.peak.worker_cores == pytest.approx(15)
    assert plan.worker_nodes == 4
    assert plan.average.worker_cores == pytest.approx(5)
    assert plan.to_json()["api_processes"] == 15


def test_requests_per_image_follow_the_code_paths() -> None:
    load = Load.per_image(COSTS, Sizes(upload_batch=20, result_downloads=1))

    assert (load.s3_get, load.s3_put) == (2, 2)  # node GETs the original, a client the result
    assert load.postgres_statements == pytest.approx(2 / 20 + 2 / 16)
    assert load.rabbitmq_messages == pytest.approx(2 + 1 / 16)
    assert load.redis_ops == pytest.approx(2 + 2 / 20)


def test_unread_results_cost_no_gets_and_no_outgoing_bytes() -> None:
    read = Load.per_image(COSTS, Sizes(result_downloads=1))
    unread = Load.per_image(COSTS, Sizes(result_downloads=0))

    assert unread.s3_get == 1
    assert unread.s3_out_bytes == 2_000_000
    assert read.s3_out_bytes == 2_250_000
    assert read.s3_in_bytes == unread.s3_in_bytes == 2_250_000


def test_archive_downloads_cost_a_get_and_the_result_bytes_each_and_pages_of_rows() -> None:
    plain = Load.per_image(COSTS, Sizes(result_downloads=0))
    archived = Load.per_image(COSTS, Sizes(result_downloads=0, archive_downloads=2))

    assert archived.s3_get == plain.s3_get + 2
    assert archived.s3_out_bytes == plain.s3_out_bytes + 2 * 250_000
    # Three passes over the rows per archive, 500 rows a page.
    assert archived.postgres_statements == pytest.approx(plain.postgres_statements + 2 * 3 / 500)
    with pytest.raises(ValueError, match="archive-downloads"):
        Sizes(archive_downloads=-1)


def test_the_first_bottleneck_is_the_lowest_ceiling_and_moves_with_the_sizes() -> None:
    narrow = plan_capacity(A_HUNDRED_PER_SECOND, COSTS, Sizes(s3_network_gbps=1))
    wide = plan_capacity(A_HUNDRED_PER_SECOND, COSTS, Sizes(s3_network_gbps=100, s3_cores=8))

    # 1 Gbit/s is 125 MB/s: 55 images/s of 2.25 MB each way.
    assert narrow.bottleneck.service == "object store network"
    assert narrow.bottleneck.images_per_s == pytest.approx(125e6 / 2_250_000)
    assert narrow.to_json()["bottleneck"]["saturated_at_peak"] is True
    # 8 cores at 10 ms per image: 800 images/s, above the peak of 300.
    assert wide.bottleneck.service == "object store CPU"
    assert wide.bottleneck.images_per_s == pytest.approx(800)
    assert wide.to_json()["bottleneck"]["saturated_at_peak"] is False
    ceilings = [limit.images_per_s for limit in wide.limits]
    assert ceilings == sorted(ceilings)


def test_a_service_whose_cost_was_not_measured_sets_no_ceiling() -> None:
    unmeasured = dataclasses.replace(COSTS, rabbitmq_cpu_s=0.0)

    limits = plan_capacity(A_HUNDRED_PER_SECOND, unmeasured, Sizes()).limits

    assert "RabbitMQ" not in [limit.service for limit in limits]
    assert "PostgreSQL" in [limit.service for limit in limits]


def test_sizes_refuse_nothing_at_all_and_a_peak_below_the_average() -> None:
    with pytest.raises(ValueError, match="cores-per-node"):
        Sizes(cores_per_node=0)
    with pytest.raises(ValueError, match="peak-factor"):
        Sizes(peak_factor=0.5)
    with pytest.raises(ValueError, match="at least 1"):
        plan_capacity(0, COSTS, Sizes())


def test_the_reference_profile_covers_the_class_the_readme_shows() -> None:
    plan = plan_capacity(10_000_000, REFERENCE_COSTS["jpeg-12mp"], Sizes())

    assert plan.average_images_per_s == pytest.approx(115.7, abs=0.05)
    assert plan.worker_nodes == 3
    assert plan.bottleneck.service == "object store network"


def test_the_readme_shows_what_the_command_prints_for_the_reference_profile() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```\n10,000,000 jpeg-12mp images a day") + len("```\n")
    shown = readme[start : readme.index("```", start)]

    assert (
        shown
        == render_text(plan_capacity(10_000_000, REFERENCE_COSTS["jpeg-12mp"], Sizes())) + "\n"
    )


def test_a_runs_original_bytes_follow_the_files_it_cycled_through() -> None:
    assert original_bytes_per_image([b"a" * 10, b"b" * 30], 3) == pytest.approx(50 / 3)


# --- the command on results files --------------------------------------------------------------


def engine_document(timestamp: str, node_cpu_s: float) -> dict[str, Any]:
    def row(batch_size: int, cpu: float) -> dict[str, Any]:
        return {
            "image_class": "jpeg-2mp",
            "count": 64,
            "batch_size": batch_size,
            "images_per_s": 40.0,
            "node_cpu_s_per_image": cpu,
            "services_cpu_s_per_image": {
                "seaweedfs": 0.004,
                "postgresql": 0.001,
                "rabbitmq": 0.0004,
                "redis": 0.0001,
            },
            "original_bytes_per_image": 500_000.0,
            "result_bytes_per_image": 200_000.0,
        }

    return {
        "command": "engine",
        "timestamp": timestamp,
        "kind": "engine",
        # Batch 1 costs more; the plan must take the larger batch, as nodes run in production.
        "runs": [row(1, node_cpu_s * 2), row(16, node_cpu_s)],
    }


def write_run(root: Path, name: str, document: dict[str, Any]) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(document))


def test_capacity_reads_the_newest_engine_and_e2e_results_for_the_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "old-engine", engine_document("2026-01-01T00:00:00+00:00", 0.5))
    write_run(tmp_path, "new-engine", engine_document("2026-02-01T00:00:00+00:00", 0.02))
    e2e = {
        "command": "e2e",
        "timestamp": "2026-02-02T00:00:00+00:00",
        "kind": "e2e",
        "settings": {"image_class": "jpeg-2mp", "route": "bulk"},
        "single": {"accepted_images_per_s": 10.0},
        "bulk": {"accepted_images_per_s": 60.0},
    }
    write_run(tmp_path, "e2e", e2e)
    argv = ["capacity", "--images-per-day", str(A_HUNDRED_PER_SECOND), "--class", "jpeg-2mp"]

    assert (
        ops_main(
            [
                *argv,
                "--results",
                str(tmp_path),
                "--json",
                "--peak-factor",
                "2",
                "--s3-network-gbps",
                "40",
            ]
        )
        == 0
    )

    plan = json.loads(capsys.readouterr().out)
    assert "new-engine" in plan["costs"]["source"]
    assert plan["costs"]["batch_size"] == 16
    assert plan["peak_images_per_s"] == pytest.approx(200)
    assert plan["peak"]["worker_cores"] == pytest.approx(4)  # 200/s x 20 ms
    assert plan["api_processes"] == 7  # 60 images/s over the bench's 2 processes: 30 each
    assert plan["peak"]["s3_in_bytes"] == pytest.approx(200 * 700_000)
    assert plan["peak"]["postgres_cores"] == pytest.approx(0.2)
    assert plan["bottleneck"]["service"] == "object store CPU"  # 8 cores / 4 ms = 2000/s

    assert ops_main([*argv, "--results", str(tmp_path)]) == 0
    screen = capsys.readouterr().out
    # 10 Gbit/s by default: 1786 images/s of 700 kB, below the CPU's 2000.
    assert "first bottleneck: object store network (ok)" in screen
    assert "worker nodes of 8 cores" in screen


def test_results_without_the_class_are_refused_naming_the_bench_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "engine", engine_document("2026-02-01T00:00:00+00:00", 0.02))
    argv = ["capacity", "--images-per-day", "1000", "--class", "png-alpha"]

    assert ops_main([*argv, "--results", str(tmp_path)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert "has no engine run of png-alpha" in err


def test_a_class_with_engine_figures_but_no_api_figures_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "engine", engine_document("2026-02-01T00:00:00+00:00", 0.02))
    argv = ["capacity", "--images-per-day", "1000", "--class", "jpeg-2mp"]
    assert ops_main([*argv, "--results", str(tmp_path / "engine" / "results.json")]) == 1
    assert "python -m bench e2e --class jpeg-2mp" in capsys.readouterr().err
