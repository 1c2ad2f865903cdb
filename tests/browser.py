"""Headless Chromium for the console's browser tests: Debian's `chromium` driven through its
`chromium-driver` with Selenium (no browser or driver is downloaded), and the steps the tests
take through the console's pages (signing in through the issuer's login form)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / ".test-artifacts" / "console"
# A machine without network must not try any: without these, Chromium keeps opening
# connections (updates, sync, QUIC probes) that pile up until the test ends.
QUIET_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1100",
)


def require_chromium() -> None:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (`make test` does)")


@contextlib.contextmanager
def chromium(profile_dir: Path, downloads: Path) -> Iterator[Any]:
    """A headless Chromium with a new empty profile, saving downloads into `downloads`."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*QUIET_FLAGS, f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


def artifacts(test_name: str) -> Path:
    """A fresh folder for the screenshots of one test (git-ignored)."""
    folder = ARTIFACTS / test_name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def text_of(driver: Any, element_id: str) -> str:
    """The element's text ("" while it is missing), read in one step: lists the page renders
    again would otherwise go stale between finding an element and reading it."""
    script = "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';"
    return str(driver.execute_script(script, element_id))


def texts(driver: Any, css: str) -> list[str]:
    """The text of every element matching `css`, read in one step."""
    script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);"
    return [str(t) for t in driver.execute_script(script, css)]


def wait_for_text(driver: Any, element_id: str, expected: str, timeout: float = 60) -> str:
    """The element's text once it contains `expected`."""

    def containing() -> str | None:
        text = text_of(driver, element_id)
        return text if expected in text else None

    found: str = wait_for(containing, timeout=timeout, what=lambda: text_of(driver, element_id))
    return found


def sign_in(driver: Any, username: str, password: str) -> None:
    """Click "Sign in", log in through the issuer's form in the pop-up, and wait until the
    console says who is signed in."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.ID, "sign-in").is_enabled(), timeout=30)
    console = driver.current_window_handle
    driver.find_element(By.ID, "sign-in").click()
    popup = wait_for(
        lambda: next((h for h in driver.window_handles if h != console), None), timeout=30
    )
    driver.switch_to.window(popup)
    wait_for(lambda: driver.find_elements(By.ID, "username"), timeout=30)
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "kc-login").click()
    driver.switch_to.window(console)
    wait_for_text(driver, "who", f"Signed in as {username}")


def page_errors(driver: Any) -> list[str]:
    """Severe messages of the page's console: script errors and CSP violations."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
