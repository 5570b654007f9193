"""Each service replies on its own inbox prefix (`_INBOX.ccbridge-<service>`, or NATS_INBOX_PREFIX),
durable pull subscribers included: deploy/nats/accounts.conf lets a user subscribe to its own
prefix only. (tests/integration/test_nats_permissions.py proves it on a real nats-server.)"""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest
from faststream.nats import PullSub
from pydantic import ValidationError

from shared import subjects
from shared.broker import TOKENS, make_broker
from shared.settings import ServiceSettings


@pytest.fixture(autouse=True)
def _no_operator_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_INBOX_PREFIX", raising=False)


def test_the_default_prefix_is_derived_from_the_service_name() -> None:
    assert subjects.inbox_prefix("vault") == "_INBOX.ccbridge-vault"
    assert make_broker(ServiceSettings(), name="vault").inbox_prefix == "_INBOX.ccbridge-vault"
    assert make_broker(ServiceSettings(), name="vault-cli", inbox_prefix="_INBOX.ccbridge-ops").inbox_prefix == (
        "_INBOX.ccbridge-ops"
    )


def test_operators_set_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_INBOX_PREFIX", "_INBOX_vault")
    settings = ServiceSettings()
    assert make_broker(settings, name="vault").inbox_prefix == "_INBOX_vault"
    assert make_broker(settings, name="vault-cli", inbox_prefix="_INBOX.ccbridge-ops").inbox_prefix == "_INBOX_vault"
    monkeypatch.setenv("NATS_INBOX_PREFIX", "")
    assert ServiceSettings().nats_inbox_prefix is None


@pytest.mark.parametrize("bad", ["_INBOX.>", "_INBOX.*.x", "_INBOX.vault.", "_INBOX vault", ".x"])
def test_a_prefix_must_be_a_plain_subject(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("NATS_INBOX_PREFIX", bad)
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_pull_subscribers_fetch_into_the_services_own_inbox() -> None:
    """FastStream gives pull subscribers `_INBOX.` unless told; the broker rewrites that default
    (routers' subscribers too) and leaves an explicit choice alone."""
    from services.vault.app import build_broker
    from services.vault.settings import VaultSettings

    broker = build_broker(VaultSettings(), MagicMock())  # the vault's subscribers live on routers

    @broker.subscriber("custom.subject", stream=TOKENS, durable="custom", pull_sub=PullSub(), inbox_prefix=b"_MINE.")
    async def custom(body: dict) -> None: ...

    broker.own_pull_inboxes()
    prefixes = {getattr(sub, "extra_options", {}).get("inbox_prefix") for sub in broker.subscribers}
    assert prefixes - {None} == {b"_INBOX.ccbridge-vault.", b"_MINE."}
