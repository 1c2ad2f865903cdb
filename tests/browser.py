"""Headless Chromium for the console's browser tests: Debian's `chromium` driven through its
`chromium-driver` with Selenium (no browser or driver is downloaded), and the steps the tests
take through the console's pages (signing in through an issuer's login form, picking files)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LoginForm:
    """An issuer's login page as the sign-in pop-up shows it: the ids of its two fields and of
    its submit button."""

    username: str = "username"
    password: str = "password"
    submit: str = "kc-login"


# The local issuer's form (ops/issuer_flows.py) uses the ids of Keycloak's own login page.
LOCAL_ISSUER_LOGIN = LoginForm()
KEYCLOAK_LOGIN = LoginForm(username="username", password="password", submit="kc-login")


def sign_in(
    driver: Any,
    username: str,
    password: str,
    form: LoginForm = LOCAL_ISSUER_LOGIN,
    login_shot: Path | None = None,
) -> None:
    """Click "Sign in", log in through the issuer's `form` in the pop-up (its screenshot, filled
    in, saved as `login_shot`), and wait until the console says who is signed in. A timeout
    names what the pop-up and the console showed."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_element(By.ID, "sign-in").is_enabled(), timeout=30)
    console = driver.current_window_handle
    driver.find_element(By.ID, "sign-in").click()
    popup = wait_for(
        lambda: next((h for h in driver.window_handles if h != console), None), timeout=30
    )
    driver.switch_to.window(popup)
    wait_for(
        lambda: driver.find_elements(By.ID, form.username),
        timeout=60,
        what=lambda: f"the login form; the pop-up shows {page_state(driver)}",
    )
    driver.find_element(By.ID, form.username).send_keys(username)
    driver.find_element(By.ID, form.password).send_keys(password)
    if login_shot is not None:
        driver.save_screenshot(str(login_shot))
    driver.find_element(By.ID, form.submit).click()

    def signed_in() -> bool:
        driver.switch_to.window(console)
        return f"Signed in as {username}" in text_of(driver, "who")

    def seen() -> str:
        left = [h for h in driver.window_handles if h != console]
        shown = f"the console shows {page_state(driver)}"
        if left:
            driver.switch_to.window(left[0])
            shown += f"; the pop-up is still open at {page_state(driver)}"
            driver.switch_to.window(console)
        return f"'Signed in as {username}': {shown}"

    wait_for(signed_in, timeout=60, interval=0.25, what=seen)


def page_state(driver: Any) -> str:
    """The current window's URL and the start of its text, for a failure message."""
    body = str(driver.execute_script("return document.body ? document.body.innerText : ''"))
    return f"{driver.current_url}: {' '.join(body.split())[:400]!r}"


def shot(driver: Any, folder: Path, name: str) -> None:
    driver.save_screenshot(str(folder / f"{name}.png"))


def find(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, css))


def pick_folder(driver: Any, folder: Path) -> None:
    """What the folder picker hands the page (`webkitdirectory`); a drop goes the same way."""
    find(driver, "#pick-folder")[0].send_keys(str(folder))


def count(driver: Any, name: str) -> int:
    """The number the batch view shows for `name` (completed, failed, ...)."""
    return int(text_of(driver, f"count-{name}") or 0)


def page_errors(driver: Any) -> list[str]:
    """Severe messages of the page's console: script errors and CSP violations."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
