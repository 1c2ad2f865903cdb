"""`python -m ops <command>`: run the local stack (up, down, logs, ps), its services and tokens.

This is a CLI edge: it reads the environment (Settings and PIXELMILL_STATE_DIR) and passes the
result down.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from minio.error import S3Error

from common.config import ConfigError, Settings, declare_local
from common.errors import DependencyUnavailable
from ops import issuer
from ops.capacity import capacity_command
from ops.demo_users import demo_user, demo_users
from ops.dlq import dlq_command
from ops.keycloak_server import KeycloakError, password_grant
from ops.s3server import S3ServerError
from ops.scale import autoscale_command, override_notice, scale_command
from ops.services import LOCAL_TEST_POSTGRES_URL, ServicesUnavailable, ensure_services
from ops.stack import (
    KEYCLOAK_NEXT_STEPS,
    LOCAL_KEYCLOAK_DB_URL,
    LOCAL_KEYCLOAK_URL,
    NEXT_STEPS,
    LocalStack,
    StackError,
    StatePaths,
    project_root,
)
from ops.status import node_check_command, status_command
from ops.test_tools import install_test_tools

Command = Callable[[list[str]], int]


def state_dir() -> Path:
    """`.state` under the project root, or PIXELMILL_STATE_DIR when set."""
    override = os.environ.get("PIXELMILL_STATE_DIR")
    return Path(override).resolve() if override else project_root() / ".state"


def local_stack(*, keycloak: bool = False) -> LocalStack:
    """The stack with the local issuer, or with the real Keycloak when asked for or when one
    that `up --keycloak` started still runs. Keycloak listens where KEYCLOAK_URL says (default
    LOCAL_KEYCLOAK_URL), its database is KEYCLOAK_DB_URL (default LOCAL_KEYCLOAK_DB_URL)."""
    environ = declare_local(os.environ)
    state = StatePaths(state_dir())
    plain = LocalStack(Settings.from_env(environ), state, child_env=environ)
    if not keycloak and not plain.keycloak_running():
        return plain
    environ["KEYCLOAK_URL"] = environ.get("KEYCLOAK_URL") or LOCAL_KEYCLOAK_URL
    database = environ.get("KEYCLOAK_DB_URL") or LOCAL_KEYCLOAK_DB_URL
    return LocalStack(
        Settings.from_env(environ), state, child_env=environ, keycloak_db_url=database
    )


def up_command(argv: list[str]) -> int:
    """Start services, SeaweedFS, the issuer (--keycloak: Keycloak), migrations, API, worker."""
    parser = argparse.ArgumentParser(prog="python -m ops up")
    parser.add_argument(
        "--keycloak", action="store_true", help="run the real Keycloak instead of the local issuer"
    )
    args = parser.parse_args(argv)
    stack = local_stack(keycloak=args.keycloak)
    stack.up()
    notice = override_notice(stack.settings)
    if notice:
        print(notice)
    steps = KEYCLOAK_NEXT_STEPS if stack.keycloak_db_url is not None else NEXT_STEPS
    print(f"\n{steps}")
    return 0


def down_command(argv: list[str]) -> int:
    """Stop what `up` started (PostgreSQL, Redis and RabbitMQ keep running)."""
    local_stack().down()
    return 0


def ps_command(argv: list[str]) -> int:
    """Show each part of the stack, its pid and log file."""
    for name, pid, log in local_stack().status():
        print(f"{name:<8} {'running, pid ' + str(pid) if pid else 'stopped':<22} {log}")
    return 0


def logs_command(argv: list[str]) -> int:
    """Follow every log under the state directory (tail -F) until Ctrl-C."""
    logs = [str(path) for path in local_stack().log_files()]
    os.execvp("tail", ["tail", "-n", "20", "-F", *argv, *logs])


def services_command(argv: list[str]) -> int:
    """Make sure PostgreSQL, Redis and RabbitMQ answer (--check-only: never install or start)."""
    parser = argparse.ArgumentParser(prog="python -m ops services")
    parser.add_argument("--check-only", action="store_true", help="report, do not start anything")
    parser.add_argument(
        "--test-database",
        action="store_true",
        help="also the test suite's database (TEST_POSTGRES_URL, else the local default)",
    )
    args = parser.parse_args(argv)
    extra = (
        [os.environ.get("TEST_POSTGRES_URL", LOCAL_TEST_POSTGRES_URL)] if args.test_database else []
    )
    ensure_services(Settings.from_env(), allow_install=not args.check_only, extra_databases=extra)
    print("PostgreSQL, Redis and RabbitMQ are reachable")
    return 0


def test_tools_command(argv: list[str]) -> int:
    """Install the programs some tests call (Debian as root); list those still missing."""
    argparse.ArgumentParser(prog="python -m ops test-tools").parse_args(argv)
    for line in install_test_tools():
        print(f"missing, its tests will skip: {line}")
    return 0


def with_state_dir(argv: list[str]) -> list[str]:
    """The issuer's arguments, pointed at our state directory unless the caller chose one."""
    if any(arg == "--state-dir" or arg.startswith("--state-dir=") for arg in argv):
        return argv
    return [*argv, "--state-dir", str(state_dir())]


def issuer_command(argv: list[str]) -> int:
    """Serve the local OIDC issuer (discovery + JWKS) in the foreground."""
    return issuer.serve_command(with_state_dir(argv))


def token_command(argv: list[str]) -> int:
    """Print an access token from the local issuer (--user, --roles, --expires-in) or Keycloak."""
    stack = local_stack()
    if stack.keycloak_db_url is None:
        return issuer.token_command(with_state_dir(argv))
    return keycloak_token(stack, argv)


def keycloak_token(stack: LocalStack, argv: list[str]) -> int:
    """A password-grant token of a demo user from the running Keycloak; the realm decides its
    roles, so --roles and --expires-in are not used."""
    parser = argparse.ArgumentParser(prog="python -m ops token")
    names = [user.username for user in demo_users()]
    parser.add_argument("--user", default="user", help=f"a demo user: {', '.join(names)}")
    parser.add_argument("--roles", help="ignored: Keycloak's realm gives the roles")
    parser.add_argument("--expires-in", help="ignored: the realm sets the lifetime")
    args = parser.parse_args(argv)
    user = demo_user(args.user)
    if user is None:
        raise KeycloakError(f"{args.user!r} is not a demo user of the local Keycloak {names}")
    auth = stack.settings.auth
    answer = password_grant(
        auth.keycloak_url, auth.realm, auth.client_id, user.username, user.password
    )
    print(answer["access_token"])
    return 0


COMMANDS: dict[str, Command] = {
    "up": up_command,
    "down": down_command,
    "ps": ps_command,
    "status": status_command,
    "logs": logs_command,
    "services": services_command,
    "test-tools": test_tools_command,
    "issuer": issuer_command,
    "token": token_command,
    "scale": scale_command,
    "autoscale": autoscale_command,
    "dlq": dlq_command,
    "node-check": node_check_command,
    "capacity": capacity_command,
}


def usage() -> str:
    lines = ["usage: python -m ops <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {(fn.__doc__ or '').strip()}" for name, fn in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[args[0]](args[1:])
    except (
        ConfigError,
        ServicesUnavailable,
        S3ServerError,
        StackError,
        KeycloakError,
        S3Error,
        DependencyUnavailable,  # the object store's wrapper refusing or not answering
    ) as exc:
        print(f"python -m ops {args[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
