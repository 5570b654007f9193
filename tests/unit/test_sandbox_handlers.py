"""Bus-side helpers of the sandbox service: salvaging invalid events, settings, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.sandbox import errors
from services.sandbox.app import load_key
from services.sandbox.handlers import delivery_count, salvage_failure
from services.sandbox.settings import SandboxSettings
from shared.events import FailureReason, derived_event_id
from shared.sealing import KeyPair


def test_salvage_names_user_and_sandbox_from_invalid_payload() -> None:
    body = json.dumps({"event_id": "evt-12345678", "user_id": "u-1", "sandbox_id": "../bad", "backend": "nope"}).encode()
    failed = salvage_failure(body, "invalid sandbox.created payload: sandbox_id: string_pattern_mismatch")
    assert failed is not None
    assert (failed.user_id, failed.sandbox_id, failed.reason, failed.retryable) == ("u-1", "../bad", "invalid_event", False)
    assert failed.cause_event_id == "evt-12345678"
    assert failed.event_id == derived_event_id("evt-12345678", "failed")


def test_salvage_without_event_id_derives_a_stable_cause() -> None:
    body = b'{"user_id": "u-1", "sandbox_id": "x", "options": 5}'
    first, second = salvage_failure(body, "d"), salvage_failure(body, "d")
    assert first is not None and second is not None
    assert first.event_id == second.event_id


@pytest.mark.parametrize(
    "body",
    [b"garbage", b"[1,2]", b'{"sandbox_id": "x"}', b'{"user_id": "u"}', b'{"user_id": 5, "sandbox_id": "x"}',
     b'{"user_id": "bad\\u0000user", "sandbox_id": "x"}', b'{"user_id": "u", "sandbox_id": "' + b"x" * 300 + b'"}',
     b"\xff\xfe"],
)
def test_nothing_salvageable_gives_no_failed_event(body: bytes) -> None:
    assert salvage_failure(body, "detail") is None


def test_delivery_count_defaults_to_first_delivery() -> None:
    class NoMeta:
        raw_message = object()

    assert delivery_count(NoMeta()) == 1


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_SANDBOX_ROOT", "SANDBOX_HPKE_PRIVATE_KEY", "SANDBOX_DEFAULT_MODE", "VAULT_REQUEST_TIMEOUT",
                 "SANDBOX_MAX_DELIVER"):
        monkeypatch.delenv(name, raising=False)
    defaults = SandboxSettings()
    assert defaults.local_sandbox_root == Path("./var/sandboxes")
    assert defaults.hpke_private_key is None
    assert (defaults.default_mode, defaults.vault_request_timeout, defaults.max_deliver) == ("file", 2.0, 5)
    monkeypatch.setenv("LOCAL_SANDBOX_ROOT", "/srv/sbx")
    monkeypatch.setenv("SANDBOX_DEFAULT_MODE", "access_only")
    monkeypatch.setenv("VAULT_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("SANDBOX_MAX_DELIVER", "9")
    key = KeyPair.generate()
    monkeypatch.setenv("SANDBOX_HPKE_PRIVATE_KEY", key.private_b64())
    settings = SandboxSettings()
    assert settings.local_sandbox_root == Path("/srv/sbx")
    assert (settings.default_mode, settings.vault_request_timeout, settings.max_deliver) == ("access_only", 0.5, 9)
    assert key.private_b64() not in repr(settings)
    assert load_key(settings).key_id == key.key_id


def test_bad_mode_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_DEFAULT_MODE", "plaintext")
    with pytest.raises(ValueError):
        SandboxSettings()


def test_key_is_created_once_under_keys_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_HPKE_PRIVATE_KEY", raising=False)
    settings = SandboxSettings(data_dir=tmp_path)
    first, second = load_key(settings), load_key(settings)
    assert first.key_id == second.key_id
    assert (tmp_path / "keys" / "sandbox.hpke.key").stat().st_mode & 0o777 == 0o600


def test_every_error_has_a_known_reason() -> None:
    known = set(FailureReason.__args__)  # type: ignore[attr-defined]
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SandboxError)]
    assert len(classes) >= 9
    for cls in classes:
        assert cls.reason in known
    assert errors.VaultUnavailable().retryable and errors.BackendError().retryable
    assert not errors.NotConnected().retryable and not errors.PathOutsideSandbox().retryable
    assert errors.BackendError("x", retryable=False).retryable is False
