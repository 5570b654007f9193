"""The AsyncAPI and OpenAPI documents under docs/ are what the code generates today."""

from __future__ import annotations

import json

import pytest

from ccbridge import contracts
from shared import subjects

RENDERED = contracts.render()


@pytest.mark.parametrize("relative", sorted(RENDERED))
def test_committed_contract_is_current(relative: str) -> None:
    committed = contracts.DOCS / relative
    assert committed.exists(), f"docs/{relative} is missing: run `python -m ccbridge.contracts`"
    assert committed.read_text() == RENDERED[relative], f"docs/{relative} is stale: run `python -m ccbridge.contracts`"


def _addresses(service: str) -> set[str]:
    document = json.loads(RENDERED[f"asyncapi/{service}.json"])
    return {channel["address"] for channel in document["channels"].values()}


def test_each_service_documents_what_it_consumes_and_publishes() -> None:
    assert {subjects.TOKENS_ISSUED, subjects.TOKENS_REVOKED, subjects.GRANTS_ISSUED,
            subjects.GRANTS_REVOKED} <= _addresses("auth")
    assert {subjects.TOKENS_ISSUED, subjects.VAULT_CREDENTIALS_GET, subjects.TOKENS_REFRESHED} <= _addresses("vault")
    sandbox = {subjects.SANDBOX_CREATED, subjects.SANDBOX_CREDENTIALS_INJECTED, subjects.SANDBOX_CREDENTIALS_FAILED}
    assert sandbox <= _addresses("sandbox")
    # Only the vault answers credential requests.
    assert subjects.VAULT_CREDENTIALS_GET not in _addresses("auth") | _addresses("sandbox")


def test_openapi_lists_the_public_routes() -> None:
    paths = json.loads(RENDERED["openapi/auth.json"])["paths"]
    for route in ("/v1/claude-code/login", "/v1/claude-code/exchange", "/v1/claude-code/status",
                  "/v1/claude-code", "/user-settings/mcp/claude-code", "/v1/claude-code/grants",
                  "/v1/claude-code/grants/{sandbox_id}"):
        assert route in paths
