"""The vault's view of a connection, asked over core NATS request/reply on
`vault.connections.status` (auth never stores tokens or connection state itself)."""

from __future__ import annotations

from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError

from services.auth.errors import VaultBadReply, VaultUnavailable
from shared import subjects
from shared.events import ConnectionStatusReply, ConnectionStatusRequest
from shared.logging import get_logger

log = get_logger(__name__)


class NatsVaultStatus:
    def __init__(self, connection: Callable[[], NatsClient], *, timeout: float = 3.0) -> None:
        """`connection` returns the live NATS client (the broker's, once it is connected)."""
        self._connection = connection
        self._timeout = timeout

    async def status(self, user_id: str) -> ConnectionStatusReply:
        request = ConnectionStatusRequest(user_id=user_id)
        try:
            response = await self._connection().request(
                subjects.VAULT_CONNECTIONS_STATUS, request.model_dump_json().encode(), timeout=self._timeout
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            log.warning("vault did not answer a status request", error_type=type(exc).__name__, timeout_s=self._timeout)
            raise VaultUnavailable() from None
        except (nats.errors.Error, OSError) as exc:
            log.warning("status request not sent", error_type=type(exc).__name__)
            raise VaultUnavailable() from None
        try:
            return ConnectionStatusReply.model_validate_json(response.data)
        except ValidationError:
            log.warning("vault status reply not understood", size=len(response.data))
            raise VaultBadReply() from None
