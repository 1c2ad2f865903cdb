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
from ops.dlq import dlq_command
from ops.s3server import S3ServerError
from ops.scale import autoscale_command, override_notice, scale_command
from ops.services import LOCAL_TEST_POSTGRES_URL, ServicesUnavailable, ensure_services
from ops.stack import NEXT_STEPS, LocalStack, StackError, StatePaths, project_root
from ops.status import node_check_command, status_command

Command = Callable[[list[str]], int]


def state_dir() -> Path:
    """`.state` under the project root, or PIXELMILL_STATE_DIR when set."""
    override = os.environ.get("PIXELMILL_STATE_DIR")
    return Path(override).resolve() if override else project_root() / ".state"


def local_stack() -> LocalStack:
    environ = declare_local(os.environ)
    return LocalStack(Settings.from_env(environ), StatePaths(state_dir()), child_env=environ)


def up_command(argv: list[str]) -> int:
    """Start services, SeaweedFS, the issuer, migrations, the API and a worker."""
    stack = local_stack()
    stack.up()
    notice = override_notice(stack.settings)
    if notice:
        print(notice)
    print(f"\n{NEXT_STEPS}")
    return 0


def down_command(argv: list[str]) -> int:
    """Stop what `up` started (PostgreSQL, Redis and RabbitMQ keep running)."""
    local_stack().down()
    return 0


def ps_command(argv: list[str]) -> int:
    """Show each part of the stack, its pid and log file."""
    for name, pid, log in local_stack().status():
        print(f"{name:<7} {'running, pid ' + str(pid) if pid else 'stopped':<22} {log}")
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


def with_state_dir(argv: list[str]) -> list[str]:
    """The issuer's arguments, pointed at our state directory unless the caller chose one."""
    if any(arg == "--state-dir" or arg.startswith("--state-dir=") for arg in argv):
        return argv
    return [*argv, "--state-dir", str(state_dir())]


def issuer_command(argv: list[str]) -> int:
    """Serve the local OIDC issuer (discovery + JWKS) in the foreground."""
    return issuer.serve_command(with_state_dir(argv))


def token_command(argv: list[str]) -> int:
    """Print an access token from the local issuer (--user, --roles, --expires-in)."""
    return issuer.token_command(with_state_dir(argv))


COMMANDS: dict[str, Command] = {
    "up": up_command,
    "down": down_command,
    "ps": ps_command,
    "status": status_command,
    "logs": logs_command,
    "services": services_command,
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
    lines += [f"  {name:<9} {(fn.__doc__ or '').strip()}" for name, fn in COMMANDS.items()]
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
        S3Error,
        DependencyUnavailable,  # the object store's wrapper refusing or not answering
    ) as exc:
        print(f"python -m ops {args[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
