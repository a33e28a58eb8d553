"""CORS: off unless VAE_CORS_ORIGINS names the allowed browser origins."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.service.conftest import MakeClient

ORIGIN = "https://demo.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,x-api-key",
}


def test_cors_is_off_by_default(make_client: MakeClient) -> None:
    with make_client() as client:
        simple = client.get("/healthz", headers={"Origin": ORIGIN})
        preflight = client.options("/encode", headers=PREFLIGHT)
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


def test_configured_origins_are_allowed_and_others_not(make_client: MakeClient) -> None:
    with make_client(cors_origins=[ORIGIN, "https://other.example"]) as client:
        simple = client.get("/sample", params={"n": 1}, headers={"Origin": ORIGIN})
        preflight = client.options("/encode", headers=PREFLIGHT)
        stranger = client.options(
            "/encode", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-seed" in simple.headers["access-control-expose-headers"].lower()
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize(
    "value, origins",
    [
        ("https://a.example", ["https://a.example"]),
        (" https://a.example, https://b.example ,", ["https://a.example", "https://b.example"]),
        ("*", ["*"]),
        ("", []),
    ],
)
def test_origins_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, origins: list[str]
) -> None:
    monkeypatch.setenv("VAE_CORS_ORIGINS", value)
    assert Settings().cors_origins == origins
