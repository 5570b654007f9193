"""Developer and test tools that act on the bus the way a service would.

`connect_user_on_bus` publishes a sealed `tokens.issued` exactly as the auth service does after a
successful exchange, so tests and benchmarks can connect users without an OAuth round trip.
"""

from __future__ import annotations

import time
from pathlib import Path

import nats

from shared import subjects
from shared.events import TokenBundle, TokensIssued, new_event_id
from shared.sealing import Recipient, issued_binding, read_public_key, seal

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
    scopes: list[str] | None = None,
    event_id: str | None = None,
) -> TokensIssued:
    event_id = event_id or new_event_id()
    scopes = scopes or DEFAULT_SCOPES
    expires_at = int((time.time() + expires_in_s) * 1000)
    bundle = TokenBundle(access_token=access_token, refresh_token=refresh_token, expires_at=expires_at, scopes=scopes)
    kind = "oauth" if refresh_token else "setup_token"
    box = seal(bundle.model_dump_json().encode(), vault, subject=subjects.TOKENS_ISSUED, message_id=event_id,
               bind=issued_binding(user_id, kind))
    return TokensIssued(
        event_id=event_id,
        user_id=user_id,
        kind=kind,
        sealed=box,
        scopes=scopes,
        expires_at=expires_at,
    )


async def connect_user_on_bus(nc: nats.NATS, vault: Recipient, user_id: str, access_token: str, **kwargs) -> TokensIssued:
    event = sealed_tokens_issued(vault, user_id, access_token, **kwargs)
    await nc.jetstream().publish(
        subjects.TOKENS_ISSUED,
        event.model_dump_json().encode(),
        headers={subjects.MSG_ID_HEADER: event.event_id},
        stream=subjects.TOKENS_STREAM.name,
    )
    return event
