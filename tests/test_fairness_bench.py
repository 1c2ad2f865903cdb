"""The fairness benchmark: its verdicts from run figures, its summary and plot, the full run's
parameters as defaults, and one tiny run on isolated services."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import build_parser
from bench.corpus import write_corpus
from bench.engine_bench import NodeSettings
from bench.fairness import FairnessConfig, run_fairness_benchmark, summarize
from bench.report import fairness_summary_markdown, generate_report
from bench.results import build_document, write_results
from common.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(lanes: bool, idle_p95: float, draining_p95: float, behind: float, rate: float) -> dict:
    return {
        "lanes": lanes,
        "idle_latency_ms": {"p50": idle_p95 / 2, "p95": idle_p95},
        "draining_latency_ms": {"p50": draining_p95 / 2, "p95": draining_p95},
        "second_owner_alone_s": 2.0,
        "second_owner_s": behind,
        "images_per_s": rate,
        "samples": [{"at_s": 1.0, "latency_s": draining_p95 / 1000}],
        "wall_s": 10.0,
        "images": 100,
    }


def test_lanes_meeting_every_target_are_reported_as_such() -> None:
    runs = [
        _run(True, 100, 150, 5.0, 99),
        _run(False, 100, 9000, 40.0, 100),
        _run(True, 120, 180, 4.0, 101),
        _run(False, 110, 8000, 30.0, 102),
        _run(True, 90, 170, 6.0, 97),
        _run(False, 100, 7000, 50.0, 98),
    ]

    summary = summarize(runs)

    on = summary["lanes_on"]
    assert on["idle_p95_ms"] == 100 and on["draining_p95_ms"] == 170
    assert on["latency_ratio"] == pytest.approx(1.7)
    assert on["second_owner_ratio"] == pytest.approx(2.5)
    assert (on["images_per_s_min"], on["images_per_s_median"], on["images_per_s_max"]) == (
        97,
        99,
        101,
    )
    assert summary["throughput_ratio"] == pytest.approx(99 / 100)
    assert summary["meets_target"] == {"latency": True, "second_owner": True, "throughput": True}


def test_slow_interactive_uploads_a_late_second_owner_or_lost_throughput_miss_the_targets() -> None:
    runs = [_run(True, 100, 250, 7.0, 90), _run(False, 100, 9000, 40.0, 100)]

    met = summarize(runs)["meets_target"]

    assert met == {"latency": False, "second_owner": False, "throughput": False}


def test_summary_and_plot_show_both_modes(tmp_path: Path) -> None:
    runs = [_run(True, 100, 150, 5.0, 99), _run(False, 100, 9000, 40.0, 100)]
    config = FairnessConfig(backlog=500, repeats=1)
    payload = {
        "kind": "fairness",
        "config": {**config.__dict__, "node": config.node.__dict__},
        "runs": runs,
        "summary": summarize(runs),
    }
    document = build_document("fairness", {}, payload, REPO_ROOT)
    markdown = fairness_summary_markdown(document)
    path = write_results(tmp_path, document, markdown)

    [plot] = generate_report([path], tmp_path / "plots")

    assert "| on |" in markdown and "| off |" in markdown
    assert "misses" not in markdown
    assert plot.name.endswith("-fairness.png") and plot.read_bytes()[:4] == b"\x89PNG"


def test_the_command_defaults_to_the_full_run() -> None:
    args = build_parser().parse_args(["fairness"])

    assert (args.backlog, args.second_owner, args.repeats) == (20_000, 200, 3)
    assert FairnessConfig().expected_seconds() > 10 * 60


@pytest.mark.slow
def test_a_tiny_run_measures_both_modes_and_every_image_finishes(
    settings: Settings, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 1, 7, ["jpeg-small", "jpeg-2mp"])
    config = FairnessConfig(
        backlog=60,
        second_owner=8,
        idle_samples=2,
        samples=2,
        sample_interval_s=0.2,
        repeats=1,
        node=NodeSettings(processes=1, batch_size=8),
        timeout_s=120,
    )

    payload: dict[str, Any] = run_fairness_benchmark(settings, corpus, config, tmp_path / "logs")

    assert [run["lanes"] for run in payload["runs"]] == [True, False]
    for run in payload["runs"]:
        # Backlog, owner B and every interactive sample, all finished.
        assert run["images"] == 60 + 8 + len(run["samples"])
        assert run["samples"] and all(s["latency_s"] > 0 for s in run["samples"])
        assert run["images_per_s"] > 0 and run["second_owner_s"] > 0
    assert set(payload["summary"]) >= {"lanes_on", "lanes_off", "throughput_ratio"}
    json.dumps(payload)
