"""OpenAPI at /openapi.json and Swagger UI at /docs on the running service: every route is
there with a summary and examples, and every documented error is problem+json with an example."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from services.auth.app import AuthService
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import openapi_examples_missing, settings_for

ROUTES = {
    ("post", "/v1/claude-code/login"), ("post", "/v1/claude-code/exchange"), ("post", "/v1/claude-code/token"),
    ("get", "/v1/claude-code/status"), ("delete", "/v1/claude-code"), ("post", "/user-settings/mcp/claude-code"),
    ("get", "/connect"), ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"),
    ("post", "/v1/claude-code/grants"), ("get", "/v1/claude-code/grants"),
    ("delete", "/v1/claude-code/grants/{sandbox_id}"),
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


async def test_docs_work_offline(auth: AuthService, http: httpx.AsyncClient) -> None:
    """Every asset /docs references is served by the service itself (no CDN): same host, 200,
    the right content type; the page's CSP allows 'self' (and its one inline script, by hash)."""
    docs = await http.get(f"{auth.base_url}/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', docs.text) + re.findall(r"url: '([^']+)'", docs.text)
    assert refs, docs.text
    wanted = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    for ref in refs:
        url = urljoin(f"{auth.base_url}/docs", ref)
        assert urlsplit(url).netloc == urlsplit(auth.base_url).netloc, f"/docs loads {ref} from another host"
        asset = await http.get(url)
        assert asset.status_code == 200, ref
        suffix = next(s for s in wanted if urlsplit(url).path.endswith(s))
        assert asset.headers["content-type"].startswith(wanted[suffix]), (ref, asset.headers["content-type"])
    assert {urlsplit(ref).path.rsplit("/", 1)[-1] for ref in refs} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    csp = dict(part.strip().split(" ", 1) for part in docs.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'"
    for directive, sources in csp.items():
        for source in sources.split():
            assert source in ("'self'", "'none'", "data:") or source.startswith("'sha256-"), (directive, source)
    assert (await http.get(f"{auth.base_url}/redoc")).status_code == 404  # ReDoc would need a CDN: off
    assert (await http.get(f"{auth.base_url}/docs/assets/..%2Fcore.py")).status_code == 404
