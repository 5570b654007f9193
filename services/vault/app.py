"""Composition root of the vault: loads key material, migrates the database, wires the store,
the use cases, the refresher, the housekeeping loop, the bus and the metrics server.
`python -m services.vault` (or `ccbridge vault`) runs `main()`.

Nothing here connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
from faststream.nats import NatsBroker
from nats.js.errors import BadRequestError

from services.vault.adapters.audit_writer import AuditWriter
from services.vault.adapters.bus import BrokerPublisher
from services.vault.adapters.oauth import USER_AGENT, HttpTokenEndpoint
from services.vault.adapters.store import SqlStore
from services.vault.handlers import (
    build_credentials_router,
    build_grants_router,
    build_revoked_router,
    build_status_router,
    build_tokens_router,
    delivery_policy,
    durable_configs,
)
from services.vault.keyring import Keyring, LiveKeyring, kek_source
from services.vault.leases import Leases
from services.vault.metrics import VaultMetrics
from services.vault.ports import AuditSink, EventPublisher, RecordCipher, Store, TokenEndpoint, UnitOfWork
from services.vault.refresher import Refresher, RefreshPolicy
from services.vault.settings import VaultSettings
from services.vault.trust import GrantKeys, TrustedRequesters, TrustStore
from services.vault.use_cases import Vault
from shared import subjects
from shared.broker import document_publishers, make_broker, provision, settle
from shared.delivery import Breakers
from shared.events import Event, GrantEnded, TokensLoginExpiring, TokensReconnectRequired, TokensRefreshed
from shared.health import HealthServer, start_health
from shared.lifecycle import Service, background, run_service
from shared.logging import get_logger
from shared.sealing import KeyPair, key_paths, load_or_create_keypair

log = get_logger(__name__)

# What the vault puts on the bus (AsyncAPI documents these; the publisher adapter sends them).
PUBLISHES: dict[str, type[Event]] = {
    subjects.TOKENS_REFRESHED: TokensRefreshed,
    subjects.TOKENS_RECONNECT_REQUIRED: TokensReconnectRequired,
    subjects.TOKENS_LOGIN_EXPIRING: TokensLoginExpiring,
    subjects.GRANTS_ENDED: GrantEnded,
}


def build_broker(settings: VaultSettings, vault: Vault, broker: NatsBroker | None = None) -> NatsBroker:
    """The vault's subscribers (streams and request/reply) and declared publishers."""
    broker = broker or make_broker(settings, name="vault")
    policy = delivery_policy(settings, vault, broker)
    broker.include_router(build_tokens_router(vault, settings, policy))
    broker.include_router(build_revoked_router(vault, settings, policy))
    broker.include_router(build_grants_router(vault, settings, policy))
    broker.include_router(build_credentials_router(vault, settings.effective_request_concurrency))
    broker.include_router(build_status_router(vault))
    document_publishers(broker, PUBLISHES)
    return broker


def documentation_broker(settings: VaultSettings) -> NatsBroker:
    """The vault's subscribers and publishers for the AsyncAPI document: composed as `open`
    composes them, on real parts that are never connected (an in-memory SQLite engine, fresh
    keys, no OAuth endpoint, nobody trusted)."""
    service = VaultService(settings, store=SqlStore.from_url("sqlite+aiosqlite://"), keyring=Keyring.generate(),
                           keypair=KeyPair.generate())
    nobody = TrustStore.fixed(TrustedRequesters(frozenset()))
    never_started = AuditWriter(service.unit_of_work)
    _, broker, _ = service.compose(nobody, GrantKeys(None, None), None, never_started)
    return broker


def load_keypair(settings: VaultSettings) -> KeyPair:
    """VAULT_HPKE_PRIVATE_KEY, else `<keys_dir>/vault.hpke.key` (created on first start).
    With the env key, `<keys_dir>/vault.hpke.pub` is kept in step so local senders find it."""
    if settings.hpke_private_key is None:
        return load_or_create_keypair(settings.keys_dir, "vault")
    pair = KeyPair.from_b64(settings.hpke_private_key.get_secret_value())
    _, public_path = key_paths(settings.keys_dir, "vault")
    try:
        if not public_path.exists() or public_path.read_text().strip() != pair.recipient.public_b64:
            public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            public_path.write_text(pair.recipient.public_b64 + "\n")
    except OSError:
        log.warning("could not write the vault public key file", path=str(public_path))
    return pair


def instance_name(settings: VaultSettings) -> str:
    return settings.instance_id or f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def live_keyring(settings: VaultSettings, metrics: VaultMetrics | None = None) -> LiveKeyring:
    """The KEK source of these settings, followed live (see `LiveKeyring`)."""
    source = kek_source(
        settings.keys_dir, env_value=settings.keks.get_secret_value() if settings.keks else None,
        path=settings.kek_path,
    )

    def reloaded(old: Keyring, new: Keyring) -> None:
        if metrics is not None:
            metrics.keyring_reloads.inc()
        log.info("key-encryption keys reloaded", active=new.active_kek_id, kek_ids=list(new.kek_ids),
                 retired=list(new.retired), previous_active=old.active_kek_id)

    def failed(exc: Exception) -> None:
        log.error("key-encryption keys not reloaded: keeping the previous set", error=type(exc).__name__,
                  detail=str(exc)[:200])

    return LiveKeyring(source, check_interval_s=settings.kek_check_interval_s, on_reload=reloaded, on_error=failed)


class VaultService(Service):
    """`async with VaultService(settings) as vault: ...` — or start()/stop().

    Optional adapters (tests swap them): `store`, `keyring` (a Keyring or LiveKeyring),
    `keypair`, `trusted` (TrustedRequesters: fixed; TrustStore: reloading), `token_endpoint`,
    `publisher`, `metrics`."""

    name = "vault"

    def __init__(
        self,
        settings: VaultSettings,
        *,
        store: Store | None = None,
        keyring: RecordCipher | None = None,
        keypair: KeyPair | None = None,
        trusted: TrustedRequesters | TrustStore | None = None,
        token_endpoint: TokenEndpoint | None = None,
        publisher: EventPublisher | None = None,
        metrics: VaultMetrics | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._store = store
        self._owns_store = store is None
        self._keyring = keyring
        self._keypair = keypair
        self._trusted = trusted
        self._token_endpoint = token_endpoint
        self._publisher = publisher
        self.metrics = metrics or VaultMetrics()
        self.instance = instance_name(settings)
        self.vault: Vault | None = None
        self.refresher: Refresher | None = None
        self.broker: NatsBroker | None = None
        self.health: HealthServer | None = None

    def __repr__(self) -> str:
        return f"VaultService(instance={self.instance!r}, started={self.started}, store={self._store!r})"

    @property
    def store(self) -> Store:
        assert self._store is not None, "VaultService not started"
        return self._store

    @property
    def keypair(self) -> KeyPair:
        assert self._keypair is not None, "VaultService not started"
        return self._keypair

    @property
    def keyring(self) -> RecordCipher:
        assert self._keyring is not None, "VaultService not started"
        return self._keyring

    @property
    def trust(self) -> TrustStore:
        assert self.vault is not None, "VaultService not started"
        return self.vault.trust

    def unit_of_work(self) -> UnitOfWork:
        assert self._store is not None and self._keyring is not None, "VaultService not started"
        return self._store.unit_of_work(self._keyring)

    async def open(self, stack: AsyncExitStack) -> None:
        """The composition root: what the vault opens, in order; each part's close is
        registered as soon as it is open (closed in reverse by `stop()`)."""
        settings = self.settings
        stack.push_async_callback(self._forget)
        # Key material: loaded once here (the KEK set then follows its source).
        self._keypair = self._keypair or load_keypair(settings)
        self._keyring = self._keyring or live_keyring(settings, self.metrics)
        trusted = self._trusted
        if trusted is None:
            trusted = TrustStore(settings.trusted_requester_keys, settings.keys_dir,
                                 min_interval_s=settings.trust_reload_min_interval_s)
        elif isinstance(trusted, TrustedRequesters):
            trusted = TrustStore.fixed(trusted)
        if self._store is None:
            self._store = SqlStore.from_url(
                settings.database_url.get_secret_value(), schema=settings.database_schema, echo=settings.db_echo,
                pool_timeout_s=settings.db_pool_timeout_s,
            )
        if self._owns_store:
            stack.push_async_callback(self._store.dispose)
        if settings.migrate_on_start:
            await self._store.migrate()
        endpoint: TokenEndpoint = (self._token_endpoint if self._token_endpoint is not None
                                   else await stack.enter_async_context(self._http_endpoint()))

        audit_writer = AuditWriter(self.unit_of_work, metrics=self.metrics)
        stack.push_async_callback(audit_writer.stop)  # after the broker: what handlers buffered is written
        if settings.grants == "off":
            log.warning("CCBRIDGE_GRANTS=off: credentials leave for ANY sandbox a bus publisher names; "
                        "use only while migrating platforms to grants")
        grant_keys = GrantKeys(settings.grant_public_keys, settings.keys_dir)
        self.vault, broker, publisher = self.compose(trusted, grant_keys, endpoint, audit_writer)
        if settings.grants == "required" and not len(grant_keys):
            log.warning("no grant key trusted yet (VAULT_GRANT_PUBLIC_KEYS, keys/auth.grant.pub): every "
                        "credentials request is refused until auth's public key is found")
        stack.push_async_callback(self._stop_broker, broker)
        await broker.connect()
        await provision(broker, settings)
        await self._ensure_consumers(broker)
        await broker.start()
        self.broker = broker
        # started (and ready) means the server routes credential requests here already
        await settle(broker.connection)
        audit_writer.start()
        background(stack, self._sweep_loop(), "vault-lease-sweeper")
        if settings.refresh_enabled:
            self.refresher = self._build_refresher(endpoint, publisher)
            self.refresher.start(settings.refresh_interval_s)
            stack.push_async_callback(self.refresher.stop)  # lets a refresh in flight finish and commit
        background(stack, self._maintenance_loop(), "vault-maintenance")
        if settings.metrics_port:
            self.health = await start_health(stack, settings, self.metrics.render, self.readiness, "vault")
        log.info(
            "vault started",
            instance=self.instance,
            key_id=self._keypair.key_id,
            kek_id=self._keyring.active_kek_id,
            trusted_requesters=len(trusted),
            refresher=settings.refresh_enabled,
            metrics=self.health.url if self.health else None,
        )
        stack.callback(log.info, "vault stopped", instance=self.instance)

    def compose(self, trusted: TrustStore, grant_keys: GrantKeys, endpoint: TokenEndpoint | None,
                audit: AuditSink) -> tuple[Vault, NatsBroker, EventPublisher]:
        """Build the use cases and the subscribers on the store, keys and endpoint in hand,
        without connecting anything (cosmicpython's bootstrap): `open` then connects them."""
        settings = self.settings
        assert self._store is not None and self._keyring is not None and self._keypair is not None
        broker = make_broker(settings, name="vault")
        publisher = self._publisher or BrokerPublisher(broker)
        store, keyring = self._store, self._keyring
        vault = Vault(
            unit_of_work=self.unit_of_work,
            read_for_release=lambda wanted: store.read_for_release(wanted, keyring),
            leases=Leases(unit_of_work=self.unit_of_work,
                          verifier=grant_keys,
                          required=settings.grants == "required", publisher=publisher, metrics=self.metrics,
                          actor=f"vault:{self.instance}"),
            keypair=self._keypair,
            trusted=trusted,
            actor=f"vault:{self.instance}",
            metrics=self.metrics,
            audit=audit,
            request_timeout_s=settings.request_timeout_s,
            audit_grants=settings.audit_grants,
            token_endpoint=endpoint,
            revoke_attempts=settings.revoke_attempts,
            breakers=Breakers(on_change=self.metrics.breakers.changed),
        )
        return vault, build_broker(settings, vault, broker), publisher

    @contextlib.asynccontextmanager
    async def _http_endpoint(self) -> AsyncIterator[TokenEndpoint]:
        """The OAuth token endpoint (refresh, revoke) over HTTP, on one connection pool."""
        settings = self.settings
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(settings.refresh_timeout_s),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            limits=httpx.Limits(max_connections=max(4, settings.refresh_concurrency * 2)),
        ) as http:
            yield HttpTokenEndpoint(
                token_url=settings.token_url, client_id=settings.oauth_client_id,
                timeout_s=settings.refresh_timeout_s, client=http,
            )

    @staticmethod
    async def _stop_broker(broker: NatsBroker) -> None:
        try:
            await broker.stop()
        except Exception:
            log.warning("broker did not stop cleanly", exc_info=True)

    async def _forget(self) -> None:
        """After the last close: a stopped service holds nothing (a restarted one starts over)."""
        self.broker = self.health = self.refresher = None
        if self._owns_store:
            self._store = None

    def _build_refresher(self, endpoint: TokenEndpoint, publisher: EventPublisher) -> Refresher:
        settings = self.settings
        policy = RefreshPolicy(
            margin_s=settings.refresh_margin_s,
            lease_s=settings.refresh_lease_s,
            http_timeout_s=settings.refresh_timeout_s,
            batch=settings.refresh_batch,
            concurrency=settings.refresh_concurrency,
            backoff_base_s=settings.refresh_backoff_base_s,
            backoff_max_s=settings.refresh_backoff_max_s,
            login_warning_s=settings.login_warning_s,
        )
        assert self.vault is not None
        vault = self.vault
        return Refresher(
            unit_of_work=self.unit_of_work,
            endpoint=endpoint,
            publisher=publisher,
            owner=self.instance,
            policy=policy,
            metrics=self.metrics,
            on_keyring_failure=lambda user_id, exc: vault.record_keyring_failure(
                user_id, exc, action="refresh_decrypt_failed"
            ),
            database=vault.breakers["database"],
        )

    async def readiness(self) -> dict[str, bool]:
        nats_ok = False
        if self.broker is not None:
            with contextlib.suppress(Exception):
                nats_ok = bool(self.broker.connection.is_connected)
        database_ok = await self._store.ping() if self._store is not None else False
        return {"database": database_ok, "nats": nats_ok}

    async def run_maintenance(self) -> dict[str, Any]:
        """Housekeeping, run by every replica every VAULT_MAINTENANCE_INTERVAL_S (idempotent)."""
        assert self.vault is not None, "VaultService not started"
        result = await self.vault.housekeeping(
            processed_retention_s=self.settings.processed_events_retention_s,
            audit_retention_s=self.settings.audit_retention_s,
            lease_retention_s=self.settings.lease_retention_s,
        )
        if self.vault.trust.reload(force=True):
            self.metrics.trust_reloads.inc()
        return result

    async def _maintenance_loop(self) -> None:
        await asyncio.sleep(min(5.0, self.settings.maintenance_interval_s))
        while True:
            try:
                with self.metrics.store_timer("maintenance"):
                    result = await self.run_maintenance()
                if any(result.get(k) for k in ("processed_events", "revocations", "audit", "sandbox_leases")):
                    log.info("housekeeping", **result)
            except Exception as exc:  # noqa: BLE001 - next time
                log.warning("housekeeping failed", error=type(exc).__name__)
            await asyncio.sleep(self.settings.maintenance_interval_s)

    async def _sweep_loop(self) -> None:
        """End expired leases and announce ended ones (grants.ended) every VAULT_LEASE_SWEEP_INTERVAL_S."""
        assert self.vault is not None
        leases = self.vault.leases
        while True:
            try:
                swept = await leases.sweep()
                if swept["expired"] or swept["announced"]:
                    log.info("leases swept", **swept)
            except Exception as exc:  # noqa: BLE001 - next time
                log.warning("lease sweep failed", error=type(exc).__name__)
            await asyncio.sleep(self.settings.lease_sweep_interval_s)

    async def _ensure_consumers(self, broker: NatsBroker) -> None:
        """Create the durable consumers, or bring existing ones' config up to date
        (pull_subscribe alone would keep whatever config it was first created with)."""
        js = broker.connection.jetstream()
        for config in durable_configs(self.settings):
            config.name = config.durable_name
            try:
                await js.add_consumer(subjects.TOKENS_STREAM.name, config=config)
            except BadRequestError as exc:  # e.g. a setting that cannot change on a live consumer
                log.warning("durable consumer config not updated", durable=config.durable_name,
                            error=exc.description)

def main() -> None:
    run_service("vault", VaultSettings, VaultService)
