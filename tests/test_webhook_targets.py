"""Which callback URLs pixelmill calls: globally reachable addresses only (and none hidden inside
an IPv6 form), ports 80 and 443 unless configured, judged at creation from the URL's literal
form alone (no DNS in a request) and again at every delivery; and batch creation counted
against a per-user rate limit like uploads."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from typing import Any

import pytest

from common.config import ConfigError, Settings, WebhookSettings
from common.webhooks import TargetRefused, check_callback_url, is_public_address
from tests.support import api_for

STRICT = WebhookSettings()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped, of a public address
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.7", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("0.0.0.0", False),
        ("192.0.2.1", False),  # documentation
        ("198.18.0.1", False),  # benchmarking
        ("240.0.0.1", False),  # reserved
        ("255.255.255.255", False),
        ("224.0.0.1", False),  # multicast
        ("239.1.2.3", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),  # unique local
        ("fec0::1", False),  # site-local (deprecated, still routed by some)
        ("ff0e::1", False),  # global-scope multicast
        ("2001:db8::1", False),  # documentation
        ("::ffff:10.0.0.1", False),  # IPv4-mapped, of a private address
        ("::ffff:127.0.0.1", False),
        ("::10.0.0.1", False),  # IPv4-compatible (deprecated)
        ("::8.8.8.8", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 prefix
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("fe80::1%eth0", False),
    ],
)
def test_only_globally_reachable_addresses_are_public(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("https://hooks.example.com/hook", None),
        ("https://hooks.example.com:443/hook?x=1", None),
        ("https://93.184.216.34/hook", None),
        ("https://[2606:4700::1111]/hook", None),
        ("https://hooks.example.com:8443/hook", "port 80, 443"),
        ("https://hooks.example.com:22/hook", "port"),
        ("https://93.184.216.34:6379/hook", "port"),
        ("http://hooks.example.com/hook", "https://"),
        ("ftp://hooks.example.com/hook", "https://"),
        ("https://user:pw@hooks.example.com/hook", "no credentials"),
        ("https:///hook", "needs a host"),
        ("https://10.1.2.3/hook", "not a public address"),
        ("https://[::ffff:10.0.0.1]/hook", "not a public address"),
        ("https://[64:ff9b::a00:1]/hook", "not a public address"),
        ("https://[::10.0.0.1]/hook", "not a public address"),
        ("https://[fec0::1]/hook", "not a public address"),
        ("https://localhost/hook", "local or private host"),
        ("https://api.localhost/hook", "local or private host"),
        ("https://printer.local/hook", "local or private host"),
        ("https://db.internal/hook", "local or private host"),
        ("https://intranet/hook", "local or private host"),
        ("https://127.1/hook", "dotted IP address"),
        ("https://2130706433/hook", "dotted IP address"),
        ("https://0x7f000001/hook", "dotted IP address"),
        ("https://exa_mple.com/hook", "not a valid host name"),
        ("https://hooks.example.com/a b", "visible ASCII"),
        ("https://hooks.example.com:99999/hook", "not a valid URL"),
    ],
)
def test_a_callback_url_is_judged_by_its_literal_form(url: str, refusal: str | None) -> None:
    if refusal is None:
        check_callback_url(url, STRICT)
    else:
        with pytest.raises(TargetRefused, match=refusal):
            check_callback_url(url, STRICT)


@pytest.mark.parametrize(
    ("environ", "ports"),
    [
        ({}, frozenset({80, 443})),
        ({"WEBHOOK_ALLOWED_PORTS": "443, 8443"}, frozenset({443, 8443})),
        ({"WEBHOOK_ALLOWED_PORTS": "any"}, None),
        # Local receivers (the local stack, the tests) listen on ports of their own.
        ({"WEBHOOK_ALLOW_PRIVATE": "true"}, None),
        ({"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_ALLOWED_PORTS": "8080"}, frozenset({8080})),
    ],
)
def test_allowed_ports_are_80_and_443_unless_configured(
    environ: dict[str, str], ports: frozenset[int] | None
) -> None:
    settings = Settings.from_env({"PIXELMILL_ENV": "local", **environ})
    assert settings.webhooks.allowed_ports == ports


@pytest.mark.parametrize("value", ["0", "65536", "http", "-1", ","])
def test_a_malformed_port_list_is_a_configuration_error_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOWED_PORTS"):
        Settings.from_env({"PIXELMILL_ENV": "local", "WEBHOOK_ALLOWED_PORTS": value})


def test_a_configured_port_is_accepted_and_others_refused() -> None:
    settings = dataclasses.replace(STRICT, allowed_ports=frozenset({8443}))
    assert check_callback_url("https://hooks.example.com:8443/h", settings).port == 8443
    with pytest.raises(TargetRefused, match="port 8443"):
        check_callback_url("https://hooks.example.com/h", settings)


def strict(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings, webhooks=dataclasses.replace(settings.webhooks, allow_private=False)
    )


def test_creating_a_batch_asks_no_dns_for_its_callback_host(
    own_database: Settings, issuer: Any, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    with api_for(strict(own_database), issuer.mint_token(user_id)) as api:
        monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
        response = api.client.simulate_post(
            "/api/v1/batches",
            json={"callback_url": "https://hooks.pixelmill-test.example/hook"},
            headers=api.headers(),
        )
    assert response.status_code == 201, response.text
    assert "hooks.pixelmill-test.example" not in asked


def test_batch_creation_counts_against_a_per_user_rate_limit(
    own_database: Settings, issuer: Any
) -> None:
    # A rate limit of this test's own (a Redis prefix nobody else uses).
    limited = dataclasses.replace(
        own_database,
        api=dataclasses.replace(own_database.api, batches_per_minute=3),
        redis_prefix=f"pmbatches:{uuid.uuid4().hex[:8]}:",
    )
    alice, bob = f"alice-{uuid.uuid4()}", f"bob-{uuid.uuid4()}"
    with api_for(limited, issuer.mint_token(alice)) as api:
        statuses = [
            api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers())
            for _ in range(4)
        ]
        assert [r.status_code for r in statuses] == [201, 201, 201, 429]
        assert statuses[-1].json["error"]["code"] == "too_many_requests"
        assert int(statuses[-1].headers["retry-after"]) > 0
        assert len(api.get("/api/v1/batches").json["items"]) == 3
    with api_for(limited, issuer.mint_token(bob)) as api:
        response = api.client.simulate_post("/api/v1/batches", json={}, headers=api.headers())
        assert response.status_code == 201, "another user's allowance is their own"
