"""How the e2b backend classifies the SDK's exceptions (retryable vs final, with a reason),
and the small pure helpers of the backend. No I/O."""

from __future__ import annotations

from pathlib import PurePosixPath

import httpx
import pytest
from e2b import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
    TemplateException,
    TimeoutException,
)
from pydantic import SecretStr

from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.e2b import E2BBackend, E2BConfig, E2BSandbox, idempotency_key, map_e2b_error
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxNotFound


@pytest.mark.parametrize(
    ("exc", "kind", "retryable", "reason"),
    [
        (SandboxNotFoundException("Paused sandbox x not found"), SandboxNotFound, False, "sandbox_not_found"),
        (SandboxNotRunningException("was not found"), SandboxNotFound, False, "sandbox_not_found"),
        (NotFoundException("404: gone"), SandboxNotFound, False, "sandbox_not_found"),
        (AuthenticationException("401: Unauthorized"), BackendUnavailable, False, "backend_unavailable"),
        (RateLimitException("429"), BackendUnavailable, True, "backend_unavailable"),
        (ServiceBusyException("503"), BackendUnavailable, True, "backend_unavailable"),
        (TimeoutException("deadline"), BackendUnavailable, True, "backend_unavailable"),
        (SandboxUnreachableException("port is not open"), BackendUnavailable, True, "backend_unavailable"),
        (httpx.ReadTimeout("timed out"), BackendUnavailable, True, "backend_unavailable"),
        (httpx.ConnectError("refused"), BackendUnavailable, True, "backend_unavailable"),
        (ConnectionRefusedError("refused"), BackendUnavailable, True, "backend_unavailable"),
        (SandboxException("500: internal error"), BackendError, True, "backend_error"),
        (SandboxException("Code.INTERNAL: boom"), BackendError, True, "backend_error"),
        (SandboxException("403: open x: permission denied"), BackendError, False, "backend_error"),
        (SandboxException("Code.PERMISSION_DENIED: nope"), BackendError, False, "backend_error"),
        (SandboxException("400: bad path"), BackendError, False, "backend_error"),
        (InvalidArgumentException("bad"), BackendError, False, "backend_error"),
        (TemplateException("old envd"), BackendError, False, "backend_error"),
        (NotEnoughSpaceException("full"), BackendError, True, "backend_error"),
        (FileNotFoundException("no such file"), BackendError, False, "backend_error"),
        (CommandExitException(stderr="chmod: Operation not permitted", stdout="", exit_code=1, error="x"),
         BackendError, False, "backend_error"),
        (CommandExitException(stderr="bash: stat: command not found", stdout="", exit_code=127, error="x"),
         BackendError, False, "backend_error"),
        (CommandExitException(stderr="mv: cannot stat 'x': No such file or directory", stdout="", exit_code=1,
                              error="x"), BackendError, True, "backend_error"),
        (RuntimeError("a bug"), BackendError, True, "backend_error"),
    ],
)
def test_sdk_errors_map_to_retryable_or_final(exc: Exception, kind: type, retryable: bool, reason: str) -> None:
    error = map_e2b_error(exc, "write /home/user/x")
    assert isinstance(error, kind)
    assert (error.retryable, error.reason) == (retryable, reason)
    assert error.detail.startswith("e2b write /home/user/x")


def test_sandbox_exception_status_code_attribute_wins() -> None:
    exc = SandboxException("something", status_code=404)
    assert map_e2b_error(exc, "x").retryable is False


def test_idempotency_key_is_stable_and_sdk_valid() -> None:
    key = idempotency_key("Evt_ABC-123")
    assert key == idempotency_key("Evt_ABC-123") != idempotency_key("Evt_ABC-124")
    assert set(key) <= set("0123456789abcdef-") and 1 <= len(key) <= 255


@pytest.mark.parametrize(
    ("home", "user", "expected"),
    [(None, None, "/home/user"), (None, "dev", "/home/dev"), (None, "root", "/root"), ("/work", "dev", "/work")],
)
def test_home_defaults(home: str | None, user: str | None, expected: str) -> None:
    target = Target(event_id="e" * 8, sandbox_id="s", backend="e2b", home=home, user=user)
    assert E2BBackend.home_of(target) == PurePosixPath(expected)


def test_config_repr_hides_the_api_key() -> None:
    config = E2BConfig(api_key=SecretStr("e2b_secret_value"))
    assert "e2b_secret_value" not in repr(config)
    assert config.api_params()["api_key"] == "e2b_secret_value"
    assert "api_url" not in config.api_params()


def test_temp_name_is_next_to_the_target() -> None:
    assert E2BSandbox.tmp_of(PurePosixPath("/home/user/.claude/.credentials.json")) == PurePosixPath(
        "/home/user/.claude/..credentials.json.ccbridge-tmp")
