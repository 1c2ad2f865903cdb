"""The programs some tests call, installed in one apt-get run on Debian as root (as in CI).

Each tool is named once with the Debian package that brings it and what the tests use it for;
`python -m ops test-tools` installs the missing ones, so those tests run instead of skipping.
Elsewhere it says what is missing and changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ops.services import apt_install, can_manage_packages


@dataclass(frozen=True)
class Tool:
    """A program the tests run, the package that installs it, and why they need it."""

    program: str
    package: str
    used_for: str

    def present(self) -> bool:
        if self.program.startswith("/"):
            return Path(self.program).is_file()
        return shutil.which(self.program) is not None


TEST_TOOLS = (
    Tool("docker-compose", "docker-compose", "validating compose.yaml"),
    Tool("promtool", "prometheus", "checking the Prometheus config and dashboard queries"),
    Tool("jq", "jq", "ops/keycloak/setup_keycloak.sh reading the realm file"),
    Tool("unzip", "unzip", "`unzip -t` on the batch archives"),
    Tool("/usr/bin/chromium", "chromium", "the console's browser tests"),
    Tool("/usr/bin/chromedriver", "chromium-driver", "driving Chromium from Selenium"),
)


def missing_tools() -> list[Tool]:
    return [tool for tool in TEST_TOOLS if not tool.present()]


def install_test_tools() -> list[str]:
    """Install what is missing; returns one line per tool that is still missing (skipped tests)."""
    missing = missing_tools()
    if missing and can_manage_packages():
        packages = sorted({tool.package for tool in missing})
        print(f"installing for the tests (apt-get): {' '.join(packages)}", flush=True)
        apt_install(*packages)
        if "prometheus" in packages:
            _stop_prometheus_server()
        missing = missing_tools()
    return [f"{tool.program} (Debian package {tool.package}): {tool.used_for}" for tool in missing]


def _stop_prometheus_server() -> None:
    """The prometheus package may start and enable its server; the tests need only promtool."""
    if Path("/run/systemd/system").is_dir():
        commands = [["systemctl", "disable", "--now", "prometheus"]]
    else:
        commands = [["service", "prometheus", "stop"], ["update-rc.d", "prometheus", "disable"]]
    for command in commands:
        subprocess.run(command, check=False, capture_output=True, stdin=subprocess.DEVNULL)
