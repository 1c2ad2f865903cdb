"""The real Keycloak for a local run and the tests: its server distribution, fetched once from
Maven Central with `mvn dependency:copy` and checked against a pinned SHA-256, built once for
PostgreSQL, then run as a background process importing the realm file compose imports.

Each running server has an instance directory of its own (its `data/`, where `--import-realm`
reads and Keycloak writes), whose `lib/`, `themes/` and `providers/` are links into the shared
distribution, so `make up` and a test session can run one each from the same download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ops.background import BackgroundProcess, Stopped, log_tail
from ops.demo_users import DEMO_FILE as DEMO_USERS_FILE

# The one place the version lives; compose.yaml's image must carry the same major.minor (a test
# compares them). A new version needs its SHA-256 here too: `sha256sum` of the tar.gz.
KEYCLOAK_VERSION = "26.7.3"
DISTRIBUTION_SHA256 = "77657f30b7e90d70f727712ce1c967f430fd6a5e9f458d32d8c6df0635345f47"
ARTIFACT = f"org.keycloak:keycloak-quarkus-dist:{KEYCLOAK_VERSION}:tar.gz"
# Build-time options, fixed once per distribution by `kc.sh build`; every start is `--optimized`.
BUILD_OPTIONS = ("--db=postgres", "--health-enabled=true")
# compose runs `start --import-realm`: the same, its image building itself on the first start.
START_ARGS = ("start", "--optimized", "--import-realm")

KEYCLOAK_FILES = Path(__file__).resolve().parent / "keycloak"
REALM_FILE = KEYCLOAK_FILES / "realm-ImageProcessor.json"
DEMO_FILE = DEMO_USERS_FILE  # imported by demo_users.sh
DEMO_USERS_SCRIPT = KEYCLOAK_FILES / "demo_users.sh"
ADMIN_USER = "admin"
_BUILT_MARKER = ".pixelmill-built"
_READY_POLL_SECONDS = 0.5


class KeycloakError(RuntimeError):
    """Keycloak could not be fetched, built, started or asked; the message says what to do."""


def missing_tools() -> str | None:
    """Why Keycloak cannot run here (no Java, no Maven), or None when it can."""
    absent = [name for name, tool in (("Java", "java"), ("Maven", "mvn")) if not shutil.which(tool)]
    if not absent:
        return None
    return f"{' and '.join(absent)} not installed: the local Keycloak needs `java` and `mvn`"


class KeycloakDistribution:
    """The server distribution under `cache_dir`: downloaded, verified, unpacked and built once."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir.resolve()

    @property
    def home(self) -> Path:
        return self.cache_dir / f"keycloak-{KEYCLOAK_VERSION}"

    @property
    def archive(self) -> Path:
        return self.cache_dir / f"keycloak-quarkus-dist-{KEYCLOAK_VERSION}.tar.gz"

    @property
    def kcadm(self) -> Path:
        return self.home / "bin" / "kcadm.sh"

    def is_built(self) -> bool:
        marker = self.home / _BUILT_MARKER
        return marker.is_file() and marker.read_text().split() == list(BUILD_OPTIONS)

    def ensure(self) -> Path:
        """The built distribution's home, fetching and building it first if needed; one process
        at a time does so (a lock file), the others wait and find it done."""
        if self.is_built():
            return self.home
        reason = missing_tools()
        if reason is not None:
            raise KeycloakError(reason)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.cache_dir / ".lock"):
            if not self.is_built():
                self._fetch()
                self._unpack()
                self._build()
        return self.home

    def _fetch(self) -> None:
        if self.archive.is_file() and _sha256(self.archive) == DISTRIBUTION_SHA256:
            return
        print(f"keycloak: fetching {ARTIFACT} (mvn dependency:copy)", flush=True)
        command = ["mvn", "-q", "-B", "dependency:copy", f"-Dartifact={ARTIFACT}"]
        command += [f"-DoutputDirectory={self.cache_dir}", "-Dmdep.overWriteReleases=true"]
        _run(command, "fetching the Keycloak distribution", cwd=self.cache_dir)
        digest = _sha256(self.archive)
        if digest != DISTRIBUTION_SHA256:
            self.archive.unlink(missing_ok=True)
            raise KeycloakError(
                f"{self.archive.name} has SHA-256 {digest}, not the pinned {DISTRIBUTION_SHA256}; "
                "the download was removed"
            )

    def _unpack(self) -> None:
        print(f"keycloak: unpacking {self.archive.name}", flush=True)
        staging = self.cache_dir / f".unpack-{KEYCLOAK_VERSION}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)
        with tarfile.open(self.archive) as archive:
            archive.extractall(staging, filter="data")
        (staging / self.home.name).rename(self.home)
        staging.rmdir()

    def _build(self) -> None:
        print(f"keycloak: building the server for {' '.join(BUILD_OPTIONS)}", flush=True)
        kc = str(self.home / "bin" / "kc.sh")
        _run([kc, "build", *BUILD_OPTIONS], "building Keycloak (kc.sh build)", cwd=self.home)
        (self.home / _BUILT_MARKER).write_text("\n".join(BUILD_OPTIONS) + "\n")


@dataclass(frozen=True)
class KeycloakOptions:
    """How one server runs: the URL clients and the API reach it at (tokens name it as their
    issuer whatever address they were asked from), its management port (health), its database
    (a postgresql:// URL, optionally a schema of it) and its bootstrap admin."""

    url: str
    management_port: int
    database_url: str
    admin_password: str
    database_schema: str | None = None

    @property
    def http_port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}/health/ready"

    def environment(self) -> dict[str, str]:
        """Keycloak's own variables: the same KC_DB settings compose gives its container."""
        db = urlsplit(self.database_url)
        env = {
            "KC_DB": "postgres",
            "KC_DB_URL": f"jdbc:postgresql://{db.hostname}:{db.port or 5432}{db.path}",
            "KC_DB_USERNAME": unquote(db.username or ""),
            "KC_DB_PASSWORD": unquote(db.password or ""),
            "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN_USER,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": self.admin_password,
            "KC_HOSTNAME": self.url,
            "KC_HTTP_ENABLED": "true",
            "KC_HTTP_HOST": "127.0.0.1",
            "KC_HTTP_PORT": str(self.http_port),
            "KC_HTTP_MANAGEMENT_PORT": str(self.management_port),
            # One node with local caches: two servers on one machine (make up and a test
            # session) must not find each other and form a cluster.
            "KC_CACHE": "local",
        }
        if self.database_schema is not None:
            env["KC_DB_SCHEMA"] = self.database_schema
        return env


class KeycloakServer:
    """One Keycloak (`kc.sh start --optimized --import-realm`) run from `instance_dir`."""

    def __init__(
        self,
        distribution: KeycloakDistribution,
        instance_dir: Path,
        options: KeycloakOptions,
        *,
        base_env: Mapping[str, str],
        log_path: Path | None = None,
        pid_path: Path | None = None,
        realm_files: Sequence[Path] = (REALM_FILE,),
    ) -> None:
        self.distribution = distribution
        self.instance_dir = instance_dir.resolve()
        self.options = options
        self.realm_files = list(realm_files)
        kc = self.instance_dir / "bin" / "kc.sh"
        self._process = BackgroundProcess(
            "keycloak",
            [str(kc), *START_ARGS],
            pid_path=pid_path or self.instance_dir / "keycloak.pid",
            log_path=log_path or self.instance_dir / "keycloak.log",
            marker=str(kc),
            env={**base_env, **options.environment()},
            cwd=self.instance_dir,
        )

    @property
    def url(self) -> str:
        return self.options.url

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def pid(self) -> int | None:
        return self._process.pid()

    def is_running(self) -> bool:
        return self._process.is_running()

    def background_process(self) -> BackgroundProcess:
        return self._process

    def start(self, timeout: float = 600.0) -> None:
        """Start the server unless it runs, and wait until it is ready (its realms imported).
        A first start on a busy 2-core machine has taken over 5 minutes; a server that dies
        ends the wait at once."""
        if not self.is_running():
            self.distribution.ensure()
            self._prepare_instance()
            self._process.start()
        self.wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> Stopped:
        return self._process.stop(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _answers_ok(self.options.ready_url):
            if not self.is_running():
                raise KeycloakError(
                    f"Keycloak exited before it was ready; log {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            if time.monotonic() >= deadline:
                raise KeycloakError(
                    f"Keycloak was not ready within {timeout:.0f} s ({self.options.ready_url}); "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_READY_POLL_SECONDS)

    def add_demo_users(self, base_env: Mapping[str, str]) -> None:
        """Run demo_users.sh, as compose's development profile does, with this distribution's
        kcadm.sh: the demo users, and password logins for the API's client."""
        env = {
            **base_env,
            "KEYCLOAK_URL": self.url,
            "KEYCLOAK_ADMIN": ADMIN_USER,
            "KEYCLOAK_ADMIN_PASSWORD": self.options.admin_password,
            "KCADM": str(self.distribution.kcadm),
            "DEMO_FILE": str(DEMO_FILE),
        }
        done = subprocess.run(
            ["bash", str(DEMO_USERS_SCRIPT)], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise KeycloakError(f"demo_users.sh failed:\n{done.stdout}{done.stderr}")

    def _prepare_instance(self) -> None:
        """bin/kc.sh copied (it finds its home from its own path), data/import holding exactly
        the realm files, everything else linked to the distribution."""
        home = self.distribution.home
        (self.instance_dir / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(home / "bin" / "kc.sh", self.instance_dir / "bin" / "kc.sh")
        for name in ("lib", "themes", "providers", "conf"):
            link = self.instance_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(home / name, target_is_directory=True)
        imports = self.instance_dir / "data" / "import"
        shutil.rmtree(imports, ignore_errors=True)
        imports.mkdir(parents=True)
        for realm_file in self.realm_files:
            shutil.copy2(realm_file, imports / realm_file.name)


def password_grant(
    base_url: str, realm: str, client_id: str, username: str, password: str
) -> dict[str, Any]:
    """The token response of a password grant (what the README's curl sends)."""
    return token_request(
        base_url,
        realm,
        {
            "grant_type": "password",
            "client_id": client_id,
            "username": username,
            "password": password,
        },
    )


def token_request(base_url: str, realm: str, form: Mapping[str, str]) -> dict[str, Any]:
    """POST `form` to the realm's token endpoint; its JSON answer, or KeycloakError."""
    url = f"{base_url.rstrip('/')}/realms/{realm}/protocol/openid-connect/token"
    body = urllib.parse.urlencode(form).encode()
    try:
        with urllib.request.urlopen(url, data=body, timeout=10) as response:
            answer: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        raise KeycloakError(f"{url} answered {exc.code}: {exc.read()[:300]!r}") from exc
    except OSError as exc:
        raise KeycloakError(f"{url} did not answer: {exc}") from exc
    return answer


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _sha256(path: Path) -> str:
    if not path.is_file():
        return "(no file)"
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(command: list[str], what: str, cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise KeycloakError(f"{what} failed (exit {done.returncode}):\n" + "\n".join(output))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
