"""Composition root of the sandbox service: wires settings, key, broker, vault client,
backends and handlers. Nothing connects at import time."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from faststream.nats import NatsBroker

from services.sandbox import domain
from services.sandbox.adapters.backends.base import BackendProvider
from services.sandbox.adapters.backends.e2b import DEPENDENCY as E2B_DEPENDENCY
from services.sandbox.adapters.backends.e2b import E2BBackend, E2BConfig
from services.sandbox.adapters.backends.local import LocalBackend
from services.sandbox.adapters.bus import (
    CONSUMERS,
    BrokerPublisher,
    consumer_config,
    ensure_consumer,
)
from services.sandbox.adapters.live_registry import KvLiveRegistry, LiveRegistry, open_live_bucket
from services.sandbox.adapters.vault_client import NatsVaultClient, VaultClient
from services.sandbox.handlers import InjectsCredentials, invalid_event_middleware, register_handlers
from services.sandbox.injector import CredentialInjector, EventPublisher, InjectionOptions
from services.sandbox.live import LiveSandboxes
from services.sandbox.metrics import MeteredInjector, MeteredPublisher, SandboxMetrics, watch_dlq_depth
from services.sandbox.settings import SandboxSettings
from services.sandbox.writer import SandboxLocks
from shared import subjects
from shared.broker import BrokerDeadLetters, document_publishers, make_broker, provision
from shared.delivery import Backoff, Breakers, DeliveryPolicy
from shared.events import Event, SandboxCredentialsFailed, SandboxCredentialsInjected, SandboxCredentialsScrubbed
from shared.health import HealthServer, start_health
from shared.lifecycle import Service, background, run_service
from shared.logging import get_logger
from shared.sealing import KeyPair, load_or_create_keypair

log = get_logger("ccbridge.sandbox")

SERVICE_NAME = "sandbox"


def load_key(settings: SandboxSettings) -> KeyPair:
    """SANDBOX_HPKE_PRIVATE_KEY if set, else `<keys_dir>/sandbox.hpke.key` (created once)."""
    if settings.hpke_private_key is not None:
        return KeyPair.from_b64(settings.hpke_private_key.get_secret_value())
    return load_or_create_keypair(settings.keys_dir, SERVICE_NAME)


def e2b_config(settings: SandboxSettings) -> E2BConfig:
    return E2BConfig(
        api_key=settings.e2b_api_key,
        domain=settings.e2b_domain,
        api_url=settings.e2b_api_url,
        sandbox_url=settings.e2b_sandbox_url,
        template=settings.e2b_template,
        request_timeout=settings.e2b_request_timeout,
        sandbox_timeout=settings.e2b_sandbox_timeout,
        request_retries=settings.e2b_request_retries,
    )


# What the sandbox service puts on the bus (AsyncAPI documents these; BrokerPublisher sends them).
PUBLISHES: dict[str, type[Event]] = {
    subjects.SANDBOX_CREDENTIALS_INJECTED: SandboxCredentialsInjected,
    subjects.SANDBOX_CREDENTIALS_FAILED: SandboxCredentialsFailed,
    subjects.SANDBOX_CREDENTIALS_SCRUBBED: SandboxCredentialsScrubbed,
}


def wire_broker(broker: NatsBroker, settings: SandboxSettings, injector: InjectsCredentials,
                live: LiveSandboxes, policy: DeliveryPolicy) -> NatsBroker:
    broker.add_middleware(invalid_event_middleware(broker))
    register_handlers(broker, injector, live, policy, settings)
    document_publishers(broker, PUBLISHES)
    return broker


def delivery_policy(settings: SandboxSettings, broker: NatsBroker, metrics: SandboxMetrics | None = None
                    ) -> DeliveryPolicy:
    """The one delivery policy, as the sandbox service's settings shape it."""
    # e2b: three failures in a row before pausing, so one sandbox's failure does not pause everybody
    breakers = Breakers(probe_interval_s=settings.breaker_probe, max_probe_interval_s=settings.breaker_max_probe,
                        open_after={E2B_DEPENDENCY: 3}, on_change=metrics.breakers.changed if metrics else None)
    return DeliveryPolicy(
        breakers=breakers,
        dead_letters=BrokerDeadLetters(broker),
        window_s=settings.retry_window,
        max_deliver=settings.max_deliver,
        backoff=Backoff(settings.retry_base_delay, settings.retry_max_delay),
        ack_wait_s=settings.ack_wait,
        observe=metrics.delivery if metrics else (lambda outcome, reason: None),
    )


def build_broker(settings: SandboxSettings) -> NatsBroker:
    """The service's subscribers (five durable consumers) and declared publishers, as the
    composition root wires them — for the AsyncAPI document: built, never connected."""
    return SandboxService(settings).compose(KeyPair.generate()).broker


@dataclass(frozen=True)
class Composition:
    """The sandbox service's object graph, built without I/O (`SandboxService.compose`)."""

    broker: NatsBroker
    injector: CredentialInjector
    live: LiveSandboxes
    policy: DeliveryPolicy
    registry: LiveRegistry
    bucket: list[Any]
    """The live-sandbox KV bucket, once `open` has opened it (the registry reads it from here)."""


def fingerprint_key(key: KeyPair) -> bytes:
    """The HMAC key of the live records' credential fingerprints, derived from the service key
    (replicas sharing SANDBOX_HPKE_PRIVATE_KEY agree on fingerprints)."""
    return hashlib.sha256(b"ccbridge/sandbox/live-fingerprint\0" + key.private_b64().encode()).digest()


class SandboxService(Service):
    """`async with SandboxService(settings):` consumes sandbox.created, sandbox.destroyed,
    tokens.refreshed, tokens.revoked and grants.ended until stopped.

    Backends: `local` (LOCAL_SANDBOX_ROOT) and `e2b` (the real SDK; E2B_* settings).
    `backend` replaces the provider of its `kind`; `vault_client` replaces the
    NATS request/reply client; `registry` the JetStream KV live-sandbox registry;
    `publisher` builds the result-event publisher from the broker (default `BrokerPublisher`).
    """

    name = SERVICE_NAME

    def __init__(
        self,
        settings: SandboxSettings,
        *,
        backend: BackendProvider | None = None,
        vault_client: VaultClient | None = None,
        registry: LiveRegistry | None = None,
        publisher: Callable[[NatsBroker], EventPublisher] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        # fail fast on a bad SANDBOX_ENV_FILE
        domain.env_file_path(settings.env_file)
        self._backends: dict[str, BackendProvider] = {
            "local": LocalBackend(settings.local_sandbox_root, durable=settings.local_fsync),
            "e2b": E2BBackend(e2b_config(settings)),
        }
        if backend is not None:
            self._backends[backend.kind] = backend
        self._vault_client = vault_client
        self._registry = registry
        self._publisher_factory = publisher
        self.key: KeyPair | None = None
        self.broker: NatsBroker | None = None
        self.injector: CredentialInjector | None = None
        self.live: LiveSandboxes | None = None
        self.metrics = SandboxMetrics()
        self.health: HealthServer | None = None
        self.policy: DeliveryPolicy | None = None

    async def open(self, stack: AsyncExitStack) -> None:
        """The composition root: what the service opens, in order; each part's close is
        registered as soon as it is open (closed in reverse by `stop()`)."""
        settings = self.settings
        for provider in self._backends.values():  # closed last: handlers may still be writing
            stack.push_async_callback(provider.aclose)
        self.key = key = self.key or load_key(settings)
        built = self.compose(key)
        broker, registry = built.broker, built.registry
        self.injector, self.live, self.policy = built.injector, built.live, built.policy
        stack.push_async_callback(self._forget_broker)
        stack.push_async_callback(broker.stop)
        await broker.connect()
        await provision(broker, settings)
        built.bucket.append(await open_live_bucket(broker.connection.jetstream(), replicas=settings.stream_replicas))
        if isinstance(registry, KvLiveRegistry):
            await registry.purge_tombstones(broker.connection.jetstream(), settings.tombstone_max_age)
        for spec in CONSUMERS:
            await ensure_consumer(broker, consumer_config(spec, ack_wait=settings.ack_wait), stream=spec.stream)
        await broker.start()
        self.broker = broker
        background(stack, watch_dlq_depth(broker.connection.jetstream(), self.metrics), "sandbox-dlq-depth")
        if settings.metrics_port:
            self.health = await start_health(stack, self.settings, self.metrics.render, self.readiness, SERVICE_NAME)
        log.info(
            "sandbox.started",
            key_id=key.key_id,
            backends=sorted(self._backends),
            local_root=str(settings.local_sandbox_root),
            default_mode=settings.default_mode,
            e2b=repr(e2b_config(settings)),
            ack_wait_s=settings.ack_wait,
            retry_window_s=settings.retry_window,
            concurrency=settings.concurrency,
        )
        stack.callback(log.info, "sandbox.stopped")

    def compose(self, key: KeyPair) -> Composition:
        """Build the object graph — adapters, use cases, delivery policy, subscribers — without
        connecting anything (cosmicpython's bootstrap): `open` then connects it."""
        settings = self.settings
        broker = make_broker(settings, name=SERVICE_NAME)
        vault = self._vault_client or NatsVaultClient(
            lambda: broker.connection, key, timeout=settings.vault_request_timeout
        )
        bucket: list[Any] = []
        registry = self._registry or KvLiveRegistry(lambda: bucket[0])
        options = InjectionOptions(
            default_mode=settings.default_mode,
            env_file=settings.env_file,
            mcp_package=settings.mcp_package,
            fingerprint_key=fingerprint_key(key),
        )
        publisher = MeteredPublisher((self._publisher_factory or BrokerPublisher)(broker), self.metrics)
        locks = SandboxLocks()
        injector = CredentialInjector(vault=vault, backends=self._backends, publisher=publisher, registry=registry,
                                      options=options, locks=locks)
        live = LiveSandboxes(vault=vault, backends=self._backends, publisher=publisher, registry=registry,
                             options=options, locks=locks, concurrency=settings.live_concurrency)
        policy = delivery_policy(settings, broker, self.metrics)
        wire_broker(broker, settings, MeteredInjector(injector, self.metrics), live, policy)
        return Composition(broker, injector, live, policy, registry, bucket)

    async def _forget_broker(self) -> None:
        self.broker = None
        self.health = None

    async def readiness(self) -> dict[str, bool]:
        """Ready = on the bus. A paused dependency (vault, e2b) does not make the service unready:
        it waits for it, and restarting it would not help."""
        connected = self.broker is not None and self.broker.connection is not None and self.broker.connection.is_connected
        return {"nats": bool(connected)}


def main() -> None:
    run_service(SERVICE_NAME, SandboxSettings, SandboxService)
