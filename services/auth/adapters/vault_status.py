"""What auth asks the vault over core NATS request/reply (auth never stores tokens, connection
state or leases itself): a connection's status on `vault.connections.status`, a person's live
grants on `vault.grants.list`. No answer in time (or nobody subscribed) is `VaultUnavailable`,
an answer that does not parse `VaultBadReply`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ValidationError

from services.auth.errors import VaultBadReply, VaultUnavailable
from shared import subjects
from shared.events import ConnectionStatusReply, ConnectionStatusRequest, GrantsListReply, GrantsListRequest
from shared.logging import get_logger

log = get_logger(__name__)

Reply = TypeVar("Reply", bound=BaseModel)


async def ask_vault(
    connection: NatsClient, subject: str, request: BaseModel, reply_model: type[Reply], *, timeout: float,
    unavailable: str | None = None,
) -> Reply:
    try:
        response = await connection.request(subject, request.model_dump_json().encode(), timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        log.warning("vault did not answer", subject=subject, error_type=type(exc).__name__, timeout_s=timeout)
        raise VaultUnavailable(unavailable) from None
    except (nats.errors.Error, OSError) as exc:
        log.warning("vault request not sent", subject=subject, error_type=type(exc).__name__)
        raise VaultUnavailable(unavailable) from None
    try:
        return reply_model.model_validate_json(response.data)
    except ValidationError:
        log.warning("vault reply not understood", subject=subject, size=len(response.data))
        raise VaultBadReply() from None


class NatsVaultStatus:
    def __init__(self, connection: Callable[[], NatsClient], *, timeout: float = 3.0) -> None:
        """`connection` returns the live NATS client (the broker's, once it is connected)."""
        self._connection = connection
        self._timeout = timeout

    async def status(self, user_id: str) -> ConnectionStatusReply:
        return await ask_vault(
            self._connection(), subjects.VAULT_CONNECTIONS_STATUS, ConnectionStatusRequest(user_id=user_id),
            ConnectionStatusReply, timeout=self._timeout,
        )


class NatsVaultGrants:
    def __init__(self, connection: Callable[[], NatsClient], *, timeout: float = 3.0) -> None:
        self._connection = connection
        self._timeout = timeout

    async def grants(self, user_id: str) -> GrantsListReply:
        return await ask_vault(
            self._connection(), subjects.VAULT_GRANTS_LIST, GrantsListRequest(user_id=user_id), GrantsListReply,
            timeout=self._timeout,
            unavailable="The vault did not answer; your grants cannot be listed right now. Retry shortly.",
        )
