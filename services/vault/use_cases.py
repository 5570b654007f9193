"""The vault's use cases. They talk to ports (unit of work) and to the sealing contract;
the bus entry points in `handlers.py` only parse, call one of these, and map the result.

Idempotency: `tokens.issued` is processed at most once per `event_id` — the event id is
recorded in `processed_events` in the same transaction as the connection change, so a
redelivery (or a duplicate that slipped past JetStream's window) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from services.vault.domain import Account, Connection, Credentials
from services.vault.errors import InvalidEvent, NotConnected, UnopenableBox
from services.vault.ports import UnitOfWork
from services.vault.trust import TrustedRequesters
from shared import subjects
from shared.events import CredentialsReply, CredentialsRequest, TokenBundle, TokensIssued, utcnow
from shared.logging import get_logger
from shared.sealing import KeyPair, SealingError, open_sealed, seal

log = get_logger(__name__)


@dataclass(frozen=True)
class StoreOutcome:
    duplicate: bool
    version: int | None = None


class Vault:
    """Holds the key material (loaded once, at start) and runs the use cases."""

    def __init__(
        self,
        *,
        unit_of_work: Callable[[], UnitOfWork],
        keypair: KeyPair,
        trusted: TrustedRequesters,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._uow = unit_of_work
        self._keypair = keypair
        self._trusted = trusted
        self._clock = clock

    def __repr__(self) -> str:
        return f"Vault(key_id={self._keypair.key_id!r}, trusted_requesters={len(self._trusted)})"

    # --- tokens.issued ----------------------------------------------------------
    def open_bundle(self, event: TokensIssued) -> TokenBundle:
        try:
            plaintext = open_sealed(
                event.sealed, self._keypair, subject=subjects.TOKENS_ISSUED, message_id=event.event_id
            )
        except SealingError as exc:
            raise UnopenableBox(str(exc)) from None
        try:
            return TokenBundle.model_validate_json(plaintext)
        except ValidationError:
            # `from None`: the validation error quotes its input, i.e. the tokens.
            raise InvalidEvent("sealed payload is not a TokenBundle") from None

    async def store_issued_tokens(self, event: TokensIssued) -> StoreOutcome:
        bundle = self.open_bundle(event)
        credentials = Credentials(access_token=bundle.access_token, refresh_token=bundle.refresh_token)
        # Values inside the sealed box are authenticated; the plaintext event fields are not.
        facts = {
            "kind": event.kind,
            "credentials": credentials,
            "scopes": tuple(bundle.scopes or event.scopes),
            "expires_at": bundle.expires_at,
            "refresh_token_expires_at": event.refresh_token_expires_at,
            "account": Account(**event.account.model_dump()) if event.account else None,
            "now": self._clock(),
        }
        async with self._uow() as uow:
            if not await uow.processed_events.mark_processed(event.event_id, subjects.TOKENS_ISSUED):
                return StoreOutcome(duplicate=True)
            connection = await uow.connections.get(event.user_id, for_update=True)
            if connection is None:
                connection = Connection.connect(user_id=event.user_id, **facts)
                await uow.connections.add(connection)
            else:
                connection.reconnect(**facts)
                await uow.connections.update(connection)
            await uow.commit()
        return StoreOutcome(duplicate=False, version=connection.version)

    # --- vault.credentials.get ----------------------------------------------------
    async def grant_credentials(self, request: CredentialsRequest) -> CredentialsReply:
        recipient = self._trusted.recipient(request.requester_public_key, request.requester_key_id)
        async with self._uow() as uow:
            connection = await uow.connections.get(request.user_id)
        if connection is None:
            raise NotConnected(f"no connection for user {request.user_id}")
        grant = connection.grant(request.mode)
        bundle = TokenBundle(
            access_token=grant.credentials.access_token,
            refresh_token=grant.credentials.refresh_token,
            expires_at=grant.expires_at,
            scopes=list(grant.scopes),
        )
        sealed = seal(
            bundle.model_dump_json().encode(),
            recipient,
            subject=subjects.VAULT_CREDENTIALS_GET,
            message_id=request.request_id,
        )
        return CredentialsReply(
            request_id=request.request_id,
            ok=True,
            sealed=sealed,
            expires_at=grant.expires_at,
            scopes=list(grant.scopes),
        )
