"""Schemathesis fuzzes the served API from its own OpenAPI document, and every check passes:
no 5xx, answers as documented, schema-valid requests accepted and invalid ones refused."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from db import images
from tests.support import ROOT, StackProbe, served_api, wait_for

# 413 (too many parts) and 414 (too many ids for a request line) refuse a request as surely
# as 400 does.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "409", "413", "414", "415", "422", "429"]

# No schema can say where an archive ends: a well-formed Range past it is 416.
[[operations]]
include-operation-id = "get_batch_archive"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "416", "429", "5xx"
]
"""
# The API's MAX_WAIT_SECONDS here: fuzzed long polls end soon.
LONGEST_WAIT_SECONDS = 5


@pytest.fixture(scope="module")
def served(
    env: dict[str, str], worker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API under real gunicorn, with a worker so that fuzzed uploads are processed."""
    log = tmp_path_factory.mktemp("fuzz-api") / "api.log"
    # Private webhook targets refused: the fuzzer must not make the server call arbitrary URLs.
    with served_api(
        env,
        log,
        "--workers",
        "1",
        "--threads",
        "4",
        WEBHOOK_ALLOW_PRIVATE="false",
        MAX_WAIT_SECONDS=str(LONGEST_WAIT_SECONDS),
    ) as (base, _):
        yield base


def run_schemathesis(base: str, token: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        "10",
        "--seed",
        "20261201",
        "--workers",
        "1",
        # A fuzzed long poll of an image still pending lasts the longest wait allowed: on a
        # busy machine that is no reason to call the request failed.
        "--request-timeout",
        str(LONGEST_WAIT_SECONDS + 15),
    ]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.fuzz_strategies"}
    return subprocess.run(
        command, cwd=workdir, env=environ, capture_output=True, text=True, timeout=240
    )


@pytest.mark.slow
@pytest.mark.parametrize("roles", [("user",), ("user", "admin")], ids=["user", "admin"])
def test_fuzzed_requests_pass_every_check_and_uploads_are_processed(
    roles: tuple[str, ...], served: str, issuer: Any, probe: StackProbe, tmp_path: Path
) -> None:
    owner = f"fuzz-{uuid.uuid4()}"
    result = run_schemathesis(served, issuer.mint_token(owner, roles), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The image strategy really produced uploads the API accepted, and none is left pending.
    assert probe.rows_for(owner)
    wait_for(
        lambda: all(r[1] in images.TERMINAL_STATUSES for r in probe.rows_for(owner)), timeout=180
    )
