"""How the e2b backend classifies the SDK's exceptions (retryable vs final, with a reason),
and the small pure helpers of the backend. No I/O."""

from __future__ import annotations

import hashlib
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
from services.sandbox.adapters.backends.e2b import (
    MAX_MERGE_BYTES,
    E2BBackend,
    E2BConfig,
    E2BSandbox,
    _Output,
    idempotency_key,
    map_e2b_error,
    put_script,
    read_script,
    staged_name,
    tmp_name,
)
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
    # Only an outage of e2b itself pauses the consumer; a sandbox's own fault never does.
    # from one sandbox's envd only e2b's own rate limiting / busy answers pause everybody
    assert error.dependency == ("e2b" if isinstance(exc, (RateLimitException, ServiceBusyException)) else None)


@pytest.mark.parametrize(
    ("exc", "dependency"),
    [
        (SandboxException("500: internal error"), "e2b"),
        (httpx.ConnectError("refused"), "e2b"),
        (TimeoutException("deadline"), "e2b"),
        (RateLimitException("429"), "e2b"),
        (SandboxNotFoundException("gone"), None),
        (SandboxException("400: bad template"), None),
        (AuthenticationException("401"), None),
    ],
)
def test_e2bs_api_failing_is_an_outage_that_pauses_everybody(exc: Exception, dependency: str | None) -> None:
    """connect/create/kill go to e2b's API: its timeouts, transport errors and 5xx mean e2b is
    down, and the delivery policy holds every injection behind one breaker."""
    assert map_e2b_error(exc, "connect", control_plane=True).dependency == dependency


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
    assert tmp_name(PurePosixPath("/home/user/.claude/.credentials.json")) == PurePosixPath(
        "/home/user/.claude/..credentials.json.ccbridge-tmp")


# --- the scripts the sandbox runs --------------------------------------------------------------
HOME = PurePosixPath("/home/user")
CREDS = HOME / ".claude/.credentials.json"


def test_no_root_no_content_in_any_command_line() -> None:
    """envd logs command lines: token bytes travel only in the upload, never in a script."""
    staged = staged_name("ab" * 16, 0)
    script = put_script("ccbT", [(HOME / ".claude", 0o700)], [(CREDS, staged, 0o600)])
    assert "sk-ant" not in script and "root" not in script and "sudo" not in script
    assert script.startswith("umask 077\ntrap 'rm -f -- /tmp/.ccbridge-stage-")
    assert f"mv -f -- {staged} /home/user/.claude/..credentials.json.ccbridge-tmp" in script
    assert "mv -f -- /home/user/.claude/..credentials.json.ccbridge-tmp /home/user/.claude/.credentials.json" in script
    assert "test -L /home/user/.claude && exit 3" in script


def test_the_read_is_bounded_and_as_the_user() -> None:
    script = read_script("ccbT", "user", [HOME / ".claude.json"])
    assert f"head -c {MAX_MERGE_BYTES + 1} -- /home/user/.claude.json | base64" in script
    assert "find /tmp -maxdepth 1 -type f -user user -name '.ccbridge-stage-*' -mmin +2 -delete" in script


def sandbox() -> E2BSandbox:
    return E2BSandbox(None, home=HOME, user="user", request_timeout=1.0, created=False)


def test_verification_ignores_noise_and_catches_a_mismatch() -> None:
    data = b'{"claudeAiOauth": {}}'
    sha = hashlib.sha256(data).hexdigest()
    good = "\n".join([
        "Welcome to the sandbox! ccbT vf 0 600 user 21 regular file",  # a login profile's noise
        "ccbT n 0", "ccbT v",
        "ccbT vd 0 700 user directory",
        f"ccbT vf 0 600 user {len(data)} regular file", f"{sha}  {CREDS}",
    ])
    dirs, files = [(HOME / ".claude", 0o700)], [(CREDS, data, 0o600)]
    assert sandbox()._verify("ccbT", _Output(0, good, ""), dirs, files, "write") == {CREDS}
    for wrong in (good.replace("600 user 21", "644 user 21"), good.replace("600 user 21", "600 root 21"),
                  good.replace(sha, "0" * 64), good.replace("700 user directory", "700 user symbolic link")):
        with pytest.raises(BackendError) as info:
            sandbox()._verify("ccbT", _Output(0, wrong, ""), dirs, files, "write")
        assert info.value.retryable is True
    with pytest.raises(BackendError) as denied:
        sandbox()._verify("ccbT", _Output(0, good.replace(sha, "0" * 64), "mv: Permission denied"), dirs, files, "w")
    assert denied.value.retryable is False


@pytest.mark.parametrize(("code", "err", "words", "retryable"), [
    (3, "", "symbolic link", False),
    (5, "", "template must give", False),
    (4, "mkdir: cannot create directory: Permission denied", "permission denied", False),
    (4, "mkdir: No space left on device", "cannot create", True),
])
def test_directory_failures_say_why(code: int, err: str, words: str, retryable: bool) -> None:
    out = "ccbT d 0\nccbT do 0 root 755 directory\n"
    with pytest.raises(BackendError) as info:
        sandbox()._verify("ccbT", _Output(code, out, err), [(HOME / ".claude", 0o700)], [], "write")
    assert words in info.value.detail and info.value.retryable is retryable
