"""Short-lived connections for operator commands to RabbitMQ, Redis and PostgreSQL.

Failing to connect to RabbitMQ or PostgreSQL raises `ServicesUnavailable` naming the service;
SERVICE_ERRORS are the errors a command reports as "this service did not answer".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pika
import psycopg
import redis

from common.broker import BROKER_ERRORS, connection_parameters
from common.config import Settings
from ops.services import ServicesUnavailable

SERVICE_ERRORS: tuple[type[Exception], ...] = (
    ServicesUnavailable,
    redis.RedisError,
    psycopg.Error,
    *BROKER_ERRORS,
)


@contextmanager
def broker_connection(settings: Settings) -> Iterator[pika.BlockingConnection]:
    """A short-lived connection; failing to connect becomes ServicesUnavailable."""
    try:
        connection = pika.BlockingConnection(connection_parameters(settings.queue))
    except BROKER_ERRORS as exc:
        where = urlsplit(settings.queue.url).hostname
        raise ServicesUnavailable(f"RabbitMQ at {where}: {exc!r}") from exc
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
    )


@contextmanager
def database(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection; connection failures become ServicesUnavailable."""
    try:
        conn = psycopg.connect(settings.postgres_url, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        raise ServicesUnavailable(f"PostgreSQL: {exc}") from exc
    with conn:
        yield conn
