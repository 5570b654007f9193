"""schemathesis against the live OpenAPI schema of a running AuthService (real NATS, the OAuth
stand-in, a vault stand-in answering status and grant-list requests), with a valid caller token.

Bounded: at most 30 generated examples per operation, plus schemathesis' explicit examples and
coverage cases. Properties: no 5xx at all, responses conform to the documented statuses,
content types and schemas, and every error is valid RFC 9457 problem+json."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from services.auth.app import build_api
from services.auth.callers import mint_caller_token
from tests.auth_fixtures import JWT_SECRET, AuthStackThread, new_user

PROBLEM = "application/problem+json"
USER = new_user()


@pytest.fixture(scope="module")
def auth_stack(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStackThread]:
    # Generous limits, so the fuzzer reaches the handlers instead of the rate limiter; the limits
    # have their own tests.
    with AuthStackThread(
        nats_url, tmp_path_factory.mktemp("auth-fuzz"), rate_limit_per_minute=100_000, rate_limit_burst=100_000,
        read_rate_limit_per_minute=100_000, read_rate_limit_burst=100_000, grant_rate_limit_per_minute=100_000,
        grant_rate_limit_burst=100_000, max_pending_logins=100,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def auth_schema(auth_stack: AuthStackThread):
    # 413 is a rejection too: spoiled bodies are often simply too large.
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 413, 422, 429]}}}
    )
    return schemathesis.openapi.from_url(f"{auth_stack.base_url}/openapi.json", config=config)


def problem_json(ctx, response, case) -> None:
    """Every error response is RFC 9457 problem+json with type/title/status."""
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith(PROBLEM), f"{response.status_code} with content-type {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict), body
    assert isinstance(body.get("type"), str) and body["type"], body
    assert isinstance(body.get("title"), str) and body["title"], body
    assert body.get("status") == response.status_code, body


def no_server_error(ctx, response, case) -> None:
    assert response.status_code < 500, f"{case.method} {case.path} → {response.status_code}: {response.text[:300]}"


def _checks() -> list:
    from schemathesis.specs.openapi import checks as openapi

    return [
        openapi.status_code_conformance,
        openapi.content_type_conformance,
        openapi.response_schema_conformance,
        openapi.response_headers_conformance,
        openapi.negative_data_rejection,
        openapi.ignored_auth,
    ]


# The operations, read from the app's own schema at collection time (the live one is the same
# app; the test itself fetches it over HTTP). schemathesis' lazy pytest loader does not work with
# pytest 9's node ids, so hypothesis drives schemathesis' strategies directly.
# Negative data only where there is input to spoil (a body or parameters).
CASES = sorted(
    (f"{method.upper()} {path}", mode)
    for path, item in build_api().openapi()["paths"].items()
    for method, operation in item.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or operation.get("requestBody") or operation.get("parameters")
)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_auth_api_never_fails_and_speaks_problem_json(
    label: str, mode: GenerationMode, auth_schema, auth_stack: AuthStackThread
) -> None:
    method, path = label.split(" ", 1)
    operation = auth_schema[path][method]
    token = mint_caller_token(JWT_SECRET, USER, ttl_s=3600)
    checks = [no_server_error, problem_json, *_checks()]

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks, timeout=30)

    run()


def test_the_fuzzer_reached_the_service(auth_stack: AuthStackThread) -> None:
    """Runs after the fuzz test (file order): the vault stand-in was asked, logins happened."""
    assert auth_stack.responder is not None and auth_stack.standin is not None
    assert any(request.user_id == USER for request in auth_stack.responder.requests)
    assert any(request.user_id == USER for request in auth_stack.responder.grant_requests)
    assert any(event.user_id == USER for event in auth_stack.responder.grants_issued)
    assert auth_stack.standin.state.stats["token:authorization_code"] >= 1  # legacy exchanges went out
