"""Bus-side helpers of the sandbox service: salvaging invalid events, settings, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.sandbox import errors
from services.sandbox.app import load_key
from services.sandbox.handlers import salvage_failure
from services.sandbox.settings import SandboxSettings
from shared.delivery import Delivery, heartbeat
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


def test_delivery_facts_default_to_a_first_delivery() -> None:
    class NoMeta:
        raw_message = object()
        body = b"x"

    facts = Delivery.of(NoMeta())
    assert (facts.delivered, facts.age_s(), facts.body) == (1, 0.0, b"x")


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_SANDBOX_ROOT", "SANDBOX_HPKE_PRIVATE_KEY", "SANDBOX_DEFAULT_MODE", "VAULT_REQUEST_TIMEOUT",
                 "SANDBOX_MAX_DELIVER"):
        monkeypatch.delenv(name, raising=False)
    defaults = SandboxSettings()
    assert defaults.local_sandbox_root == Path("./var/sandboxes")
    assert defaults.hpke_private_key is None
    # the refresh token stays in the vault unless a platform asks for (and is granted) file mode
    assert (defaults.default_mode, defaults.vault_request_timeout, defaults.max_deliver) == ("access_only", 2.0, 0)
    assert defaults.retry_window == 300.0  # retries ride out five minutes; a count only caps if set
    monkeypatch.setenv("LOCAL_SANDBOX_ROOT", "/srv/sbx")
    monkeypatch.setenv("SANDBOX_DEFAULT_MODE", "file")
    monkeypatch.setenv("VAULT_REQUEST_TIMEOUT", "0.5")
    monkeypatch.setenv("SANDBOX_MAX_DELIVER", "9")
    key = KeyPair.generate()
    monkeypatch.setenv("SANDBOX_HPKE_PRIVATE_KEY", key.private_b64())
    settings = SandboxSettings()
    assert settings.local_sandbox_root == Path("/srv/sbx")
    assert (settings.default_mode, settings.vault_request_timeout, settings.max_deliver) == ("file", 0.5, 9)
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
    known = set(FailureReason.__args__)
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SandboxError)]
    assert len(classes) >= 9
    for cls in classes:
        assert cls.reason in known
    assert errors.VaultUnavailable().retryable and errors.BackendError().retryable
    assert not errors.NotConnected().retryable and not errors.PathOutsideSandbox().retryable
    assert errors.BackendError("x", retryable=False).retryable is False


def test_e2b_and_live_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("E2B_API_KEY", "E2B_DOMAIN", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_TEMPLATE",
                 "E2B_REQUEST_TIMEOUT", "SANDBOX_ENV_FILE", "SANDBOX_MCP_PACKAGE"):
        monkeypatch.delenv(name, raising=False)
    defaults = SandboxSettings()
    assert (defaults.e2b_api_key, defaults.e2b_domain, defaults.e2b_template) == (None, "e2b.app", "base")
    assert defaults.env_file == ".config/ccbridge/env"
    assert defaults.mcp_package == "@steipete/claude-code-mcp@1.10.12"  # pinned, never a moving tag
    for unpinned in ("@steipete/claude-code-mcp@latest", "@steipete/claude-code-mcp", "pkg@^1.0.0", "pkg@>=1"):
        monkeypatch.setenv("SANDBOX_MCP_PACKAGE", unpinned)
        with pytest.raises(ValueError):
            SandboxSettings()
    monkeypatch.delenv("SANDBOX_MCP_PACKAGE")
    monkeypatch.setenv("E2B_API_KEY", "e2b_very_secret")
    monkeypatch.setenv("E2B_API_URL", "http://127.0.0.1:1234")
    monkeypatch.setenv("E2B_SANDBOX_URL", "http://127.0.0.1:5678")
    monkeypatch.setenv("E2B_TEMPLATE", "claude")
    monkeypatch.setenv("E2B_REQUEST_TIMEOUT", "4.5")
    monkeypatch.setenv("SANDBOX_ENV_FILE", "etc/claude.env")
    settings = SandboxSettings()
    assert settings.e2b_api_key is not None and settings.e2b_api_key.get_secret_value() == "e2b_very_secret"
    assert "e2b_very_secret" not in repr(settings)
    assert (settings.e2b_api_url, settings.e2b_sandbox_url) == ("http://127.0.0.1:1234", "http://127.0.0.1:5678")
    assert (settings.e2b_template, settings.e2b_request_timeout, settings.env_file) == ("claude", 4.5, "etc/claude.env")


def test_a_bad_env_file_setting_stops_the_service_at_construction(tmp_path: Path) -> None:
    from services.sandbox.app import SandboxService

    with pytest.raises(ValueError):
        SandboxService(SandboxSettings(data_dir=tmp_path, env_file="../outside"))


def test_jetstream_never_drops_a_message_on_its_own() -> None:
    """The delivery policy decides when to give up (and then reports and terminates): JetStream
    itself caps no deliveries, so a message whose report failed always comes back."""
    from services.sandbox.adapters.bus import CONSUMERS, consumer_config

    assert {consumer_config(spec, ack_wait=30).max_deliver for spec in CONSUMERS} == {-1}


def test_build_broker_declares_five_consumers_and_three_published_events() -> None:
    """What `ccbridge.contracts` renders as the service's AsyncAPI (no connection made)."""
    from faststream.specification import AsyncAPI

    from services.sandbox.app import build_broker

    spec = AsyncAPI(build_broker(SandboxSettings(NATS_URL="nats://nats:4222")), title="sandbox", version="1")
    document = json.loads(spec.to_specification().to_json())
    channels = " ".join(sorted(document["channels"]))
    for subject in ("sandbox.created", "sandbox.destroyed", "tokens.refreshed", "tokens.revoked", "grants.ended",
                    "sandbox.credentials.injected", "sandbox.credentials.failed", "sandbox.credentials.scrubbed"):
        assert subject in channels


async def test_working_beats_in_progress_while_the_body_runs_and_stops_after() -> None:

    class Msg:
        def __init__(self) -> None:
            self.beats = 0

        async def in_progress(self) -> None:
            self.beats += 1

    quick, slow = Msg(), Msg()
    async with heartbeat(quick, 0.6):  # beats every 0.2 s
        await asyncio.sleep(0.05)
    async with heartbeat(slow, 0.6):
        await asyncio.sleep(0.5)
    after = slow.beats
    await asyncio.sleep(0.3)
    assert quick.beats == 0  # done before the first beat: nothing sent
    assert after >= 2 and slow.beats == after  # beat while running, never after
