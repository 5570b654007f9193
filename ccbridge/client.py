"""A small typed client for platform services that talk to ccbridge.

    grant = await request_grant(auth_url, caller_token, "sbx-1")    # the person's grant (HTTP)
    async with CcbridgeClient(nats_url) as ccb:     # CcbridgeClient(): NATS_URL, else `ccbridge up`'s
        result = await ccb.prepare_sandbox("sbx-1", "user-42", grant=grant.token)

Connecting is bounded (`connect_timeout`, 5 s): an unreachable NATS raises `CcbridgeUnavailable`
in time, one line, no retry loop; no result within `timeout` raises `CcbridgeTimeout`.

A grant is the person's signed permission for ONE sandbox to hold their credentials
(`POST /v1/claude-code/grants` on auth, with that person's caller token); without one the vault
releases nothing (`sandbox.credentials.failed`, reason `grant_required`).

It subscribes to results before publishing (no race), sets `event_id` = `Nats-Msg-Id` (a retried
publish is deduplicated by JetStream) and serves many concurrent calls on one connection.

Connect as the NATS user `platform` (deploy/nats/accounts.conf). Its replies come on the inbox
prefix `_INBOX.ccbridge-platform`, the only inbox that user may read; pass `inbox_prefix` if your
NATS account grants another one.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from shared import nats_connect, subjects
from shared.events import (
    Backend,
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialMode,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    SandboxOptions,
    TokensRevoked,
    new_event_id,
)

SandboxResult = SandboxCredentialsInjected | SandboxCredentialsFailed
PLATFORM_INBOX_PREFIX = subjects.inbox_prefix("platform")


class CcbridgeTimeout(TimeoutError):
    """No result arrived in time. Safe to call again with the same event_id."""

    def __init__(self, sandbox_id: str, event_id: str, timeout: float) -> None:
        super().__init__(
            f"no result for sandbox {sandbox_id!r} (event {event_id}) within {timeout:g}s: "
            "is the ccbridge sandbox service running?"
        )
        self.sandbox_id = sandbox_id
        self.event_id = event_id


class CcbridgeUnavailable(ConnectionError):
    """The service that answers this question is not reachable on the bus."""


class GrantRefused(Exception):
    """Auth did not grant the sandbox: `status` and the problem's `detail` say why (a bad caller
    token is 401, a sandbox id or ttl out of bounds 422, rate limits 429, auth busy 503)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"auth refused the grant ({status}): {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Grant:
    """`POST /v1/claude-code/grants`' answer. `token` goes into `prepare_sandbox(grant=...)`."""

    token: str
    sandbox_id: str
    mode: str
    expires_at: str

    def __repr__(self) -> str:  # the JWS authorises a sandbox: keep it out of logs
        return f"Grant(sandbox_id={self.sandbox_id!r}, mode={self.mode!r}, expires_at={self.expires_at!r})"


async def request_grant(
    auth_url: str,
    caller_token: str,
    sandbox_id: str,
    *,
    mode: CredentialMode | None = None,
    ttl_s: int | None = None,
    http: httpx.AsyncClient | None = None,
    timeout: float = 10.0,
) -> Grant:
    """Ask auth for the person's grant for one sandbox (`caller_token`: that person's JWT).
    Asking again for the same sandbox extends or shortens its lease (the newest grant wins)."""
    body: dict[str, Any] = {"sandbox_id": sandbox_id}
    if mode is not None:
        body["mode"] = mode
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    url = f"{auth_url.rstrip('/')}/v1/claude-code/grants"
    headers = {"Authorization": f"Bearer {caller_token}"}
    if http is None:
        async with httpx.AsyncClient(timeout=timeout) as own:
            response = await own.post(url, json=body, headers=headers)
    else:
        response = await http.post(url, json=body, headers=headers, timeout=timeout)
    if response.status_code != 201:
        try:
            detail = str(response.json().get("detail") or response.reason_phrase)
        except ValueError:
            detail = response.reason_phrase
        raise GrantRefused(response.status_code, detail[:300])
    doc = response.json()
    return Grant(token=doc["grant"], sandbox_id=doc["sandbox_id"], mode=doc["mode"], expires_at=doc["expires_at"])


class CcbridgeClient:
    def __init__(
        self,
        nats_url: str | None = None,
        *,
        connection: NatsClient | None = None,
        name: str = "ccbridge-client",
        inbox_prefix: str = PLATFORM_INBOX_PREFIX,
        connect_timeout: float = 5.0,
    ) -> None:
        """`nats_url`: the `platform` user's URL; None → `NATS_URL`, else the `platform` URL of
        the stack `ccbridge up` runs on `CCBRIDGE_DATA_DIR` (its stack.json), else
        nats://127.0.0.1:4222. `connection`: use this one (its own inbox prefix) instead.
        `connect_timeout`: entering the client connects within it or raises `CcbridgeUnavailable`."""
        self._url = nats_url
        self._name = name
        self._inbox_prefix = inbox_prefix
        self._connect_timeout = connect_timeout
        self._nc = connection
        self._owns_connection = connection is None
        self._waiters: dict[str, asyncio.Future[SandboxResult]] = {}
        self._subscription: Any = None

    @property
    def nats_url(self) -> str:
        """The URL this client connects to (it may hold a password: print `redact_url(...)`)."""
        if self._url is None:
            from ccbridge import stackfile

            self._url = stackfile.nats_url("platform").value
        return self._url

    async def __aenter__(self) -> CcbridgeClient:
        if self._nc is None:
            try:
                self._nc = await nats_connect.connect(self.nats_url, timeout=self._connect_timeout, name=self._name,
                                                      inbox_prefix=self._inbox_prefix)
            except nats_connect.BusUnreachable as exc:
                raise CcbridgeUnavailable(str(exc)) from None
        self._subscription = await self._nc.subscribe("sandbox.credentials.*", cb=self._on_result)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
        for waiter in self._waiters.values():
            waiter.cancel()
        if self._owns_connection and self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.drain(), self._connect_timeout)
            except Exception:  # noqa: BLE001 - a connection that went away: just close it
                with contextlib.suppress(Exception):
                    await self._nc.close()

    async def _on_result(self, msg: Msg) -> None:
        model = (
            SandboxCredentialsInjected
            if msg.subject == subjects.SANDBOX_CREDENTIALS_INJECTED
            else SandboxCredentialsFailed
        )
        try:
            result = model.model_validate_json(msg.data)
        except ValidationError:
            return  # not ours to judge; the publisher's problem
        waiter = self._waiters.get(result.cause_event_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def expect_result(self, cause_event_id: str) -> asyncio.Future[SandboxResult]:
        """A future for the result of `sandbox.created` event `cause_event_id` (e.g. one a replay
        or another publisher sends). Call before the event is published."""
        waiter = self._waiters.get(cause_event_id)
        if waiter is None:
            waiter = self._waiters[cause_event_id] = asyncio.get_running_loop().create_future()
        return waiter

    async def prepare_sandbox(
        self,
        sandbox_id: str,
        user_id: str,
        *,
        backend: Backend = "local",
        mode: CredentialMode | None = None,
        mcp: bool = False,
        home: str | None = None,
        user: str | None = None,
        template: str | None = None,
        config_dir: str | None = None,
        timeout: float = 30.0,
        event_id: str | None = None,
        grant: str | None = None,
    ) -> SandboxResult:
        """Publish `sandbox.created` and wait for `injected` or `failed` for exactly this event.
        `grant`: the person's grant for this sandbox (`request_grant(...).token`)."""
        assert self._nc is not None, "use `async with CcbridgeClient(...)`"
        event = SandboxCreated(
            event_id=event_id or new_event_id(),
            user_id=user_id,
            sandbox_id=sandbox_id,
            backend=backend,
            home=home,
            user=user,
            template=template,
            grant=grant,
            options=SandboxOptions(mode=mode, mcp=mcp, config_dir=config_dir),
        )
        waiter = self.expect_result(event.event_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            try:
                ack = await self._nc.jetstream().publish(
                    subjects.SANDBOX_CREATED,
                    event.model_dump_json().encode(),
                    headers={subjects.MSG_ID_HEADER: event.event_id},
                    stream=subjects.SANDBOX_STREAM.name,
                    timeout=max(0.1, min(5.0, timeout)),
                )
            except nats.errors.NoRespondersError:
                raise CcbridgeUnavailable(
                    f"no JetStream stream takes {subjects.SANDBOX_CREATED} on this NATS: is it ccbridge's, "
                    "and has a ccbridge service started once?"
                ) from None
            if ack.duplicate:
                # A retry of an event JetStream already holds: its result, if any, is in the stream.
                earlier = await self._earlier_result(event.event_id)
                if earlier is not None:
                    return earlier
            return await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
        except TimeoutError as exc:
            raise CcbridgeTimeout(sandbox_id, event.event_id, timeout) from exc
        finally:
            self._waiters.pop(event.event_id, None)

    async def _earlier_result(self, cause_event_id: str) -> SandboxResult | None:
        """Scan recent results (the stream's duplicate window) for the answer to `cause_event_id`."""
        assert self._nc is not None
        js = self._nc.jetstream()
        since = datetime.now(UTC) - timedelta(seconds=subjects.SANDBOX_STREAM.duplicate_window_s + 60)
        sub = await js.subscribe(
            "sandbox.credentials.*",
            stream=subjects.SANDBOX_STREAM.name,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    return None
                await self._on_result(msg)
                waiter = self._waiters.get(cause_event_id)
                if waiter is not None and waiter.done():
                    return waiter.result()
        finally:
            await sub.unsubscribe()

    async def connection_status(self, user_id: str, *, timeout: float = 5.0) -> ConnectionStatusReply:
        """What the vault holds for this person (never a token)."""
        assert self._nc is not None, "use `async with CcbridgeClient(...)`"
        request = ConnectionStatusRequest(user_id=user_id)
        try:
            reply = await self._nc.request(
                subjects.VAULT_CONNECTIONS_STATUS, request.model_dump_json().encode(), timeout=timeout
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise CcbridgeUnavailable(f"the vault did not answer {subjects.VAULT_CONNECTIONS_STATUS}") from exc
        return ConnectionStatusReply.model_validate_json(reply.data)

    async def disconnect(self, user_id: str, *, reason: str = "user_request", event_id: str | None = None) -> str:
        """Publish `tokens.revoked`: the vault shreds the credentials, live sandboxes are scrubbed.
        Returns the event id (retrying with it is safe)."""
        assert self._nc is not None, "use `async with CcbridgeClient(...)`"
        event = TokensRevoked(event_id=event_id or new_event_id(), user_id=user_id, reason=reason)
        await self._nc.jetstream().publish(
            subjects.TOKENS_REVOKED,
            event.model_dump_json().encode(),
            headers={subjects.MSG_ID_HEADER: event.event_id},
            stream=subjects.TOKENS_STREAM.name,
        )
        return event.event_id
