"""Developer and test tools that act on the bus the way a service would.

`connect_user_on_bus` publishes a sealed `tokens.issued` exactly as the auth service does after a
successful exchange, so tests and benchmarks can connect users without an OAuth round trip.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import nats

from shared import subjects
from shared.events import TokenBundle, TokensIssued, new_event_id
from shared.sealing import Recipient, read_public_key, seal_tokens

DEFAULT_SCOPES = ["user:profile", "user:inference", "user:sessions:claude_code"]


def vault_recipient(keys_dir: Path) -> Recipient:
    recipient = read_public_key(Path(keys_dir), "vault")
    if recipient is None:
        raise FileNotFoundError(f"no vault public key in {keys_dir}: start the vault once")
    return recipient


def sealed_tokens_issued(
    vault: Recipient,
    user_id: str,
    access_token: str,
    *,
    refresh_token: str | None = "sk-ant-ort01-dev-refresh-token",
    expires_in_s: int = 8 * 3600,
    expires_at: int | None = None,
    scopes: list[str] | None = None,
    event_id: str | None = None,
    kind: Literal["oauth", "setup_token"] | None = None,
    **facts: Any,
) -> TokensIssued:
    """A `tokens.issued` as auth sends it (the bundle sealed to the vault, bound to this event,
    person and kind), for the dev tools, the tests and the bench. `facts`: the event's other
    fields (refresh_token_expires_at, account, occurred_at)."""
    event_id = event_id or new_event_id()
    scopes = scopes if scopes is not None else DEFAULT_SCOPES
    expires_at = expires_at if expires_at is not None else int((time.time() + expires_in_s) * 1000)
    bundle = TokenBundle(access_token=access_token, refresh_token=refresh_token, expires_at=expires_at, scopes=scopes)
    kind = kind or ("oauth" if refresh_token else "setup_token")
    box = seal_tokens(bundle, vault, event_id=event_id, user_id=user_id, kind=kind)
    return TokensIssued(event_id=event_id, user_id=user_id, kind=kind, sealed=box, scopes=scopes,
                        expires_at=expires_at, **facts)


async def connect_user_on_bus(nc: nats.NATS, vault: Recipient, user_id: str, access_token: str, **kwargs) -> TokensIssued:
    event = sealed_tokens_issued(vault, user_id, access_token, **kwargs)
    await nc.jetstream().publish(
        subjects.TOKENS_ISSUED,
        event.model_dump_json().encode(),
        headers={subjects.MSG_ID_HEADER: event.event_id},
        stream=subjects.TOKENS_STREAM.name,
    )
    return event
