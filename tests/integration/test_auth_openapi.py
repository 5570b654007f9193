"""OpenAPI at /openapi.json and Swagger UI at /docs on the running service: every route is
there with a summary and examples, and every documented error is problem+json with an example."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.auth.app import AuthService
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import http, openapi_examples_missing, settings_for, standin, vault_key  # noqa: F401

ROUTES = {
    ("post", "/v1/claude-code/login"), ("post", "/v1/claude-code/exchange"), ("post", "/v1/claude-code/token"),
    ("get", "/v1/claude-code/status"), ("delete", "/v1/claude-code"), ("post", "/user-settings/mcp/claude-code"),
    ("get", "/connect"), ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
}


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair) -> AsyncIterator[AuthService]:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key)) as service:
        yield service


async def test_openapi_has_every_route_with_examples(auth: AuthService, http: httpx.AsyncClient) -> None:
    spec = (await http.get(f"{auth.base_url}/openapi.json")).json()
    found = {(method, path) for path, item in spec["paths"].items() for method in item}
    assert found == ROUTES
    assert openapi_examples_missing(spec) == []
    for method, path in ROUTES:
        operation = spec["paths"][path][method]
        assert operation.get("summary"), (method, path)
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")) and path not in ("/readyz",):
                media = response["content"]["application/problem+json"]
                assert media["example"]["status"] == int(status), (method, path, status)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_docs_page_is_served(auth: AuthService, http: httpx.AsyncClient) -> None:
    docs = await http.get(f"{auth.base_url}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
