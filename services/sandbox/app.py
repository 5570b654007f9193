"""Composition root of the sandbox service: wires settings, key, broker, vault client,
backends and handlers. Nothing connects at import time."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from types import TracebackType

from faststream.nats import NatsBroker

from shared.broker import make_broker, provision
from shared.logging import configure_logging, get_logger
from shared.sealing import KeyPair, load_or_create_keypair
from services.sandbox.adapters.backends.base import BackendProvider
from services.sandbox.adapters.backends.local import LocalBackend
from services.sandbox.adapters.bus import BrokerPublisher, created_consumer_config, ensure_consumer
from services.sandbox.adapters.vault_client import NatsVaultClient, VaultClient
from services.sandbox.handlers import invalid_event_middleware, register_handlers
from services.sandbox.injector import CredentialInjector, RetryPolicy
from services.sandbox.settings import SandboxSettings

log = get_logger("ccbridge.sandbox")

SERVICE_NAME = "sandbox"


def load_key(settings: SandboxSettings) -> KeyPair:
    """SANDBOX_HPKE_PRIVATE_KEY if set, else `<keys_dir>/sandbox.hpke.key` (created once)."""
    if settings.hpke_private_key is not None:
        return KeyPair.from_b64(settings.hpke_private_key.get_secret_value())
    return load_or_create_keypair(settings.keys_dir, SERVICE_NAME)


class SandboxService:
    """`async with SandboxService(settings):` consumes sandbox.created until stopped.

    `backend` replaces the provider of its `kind` (default: the local backend under
    LOCAL_SANDBOX_ROOT); `vault_client` replaces the NATS request/reply client.
    """

    def __init__(
        self,
        settings: SandboxSettings,
        *,
        backend: BackendProvider | None = None,
        vault_client: VaultClient | None = None,
    ) -> None:
        self.settings = settings
        self._backends: dict[str, BackendProvider] = {"local": LocalBackend(settings.local_sandbox_root)}
        if backend is not None:
            self._backends[backend.kind] = backend
        self._vault_client = vault_client
        self.key: KeyPair | None = None
        self.broker: NatsBroker | None = None
        self.injector: CredentialInjector | None = None

    async def start(self) -> None:
        if self.broker is not None:
            return
        settings = self.settings
        self.key = key = self.key or load_key(settings)
        broker = make_broker(settings, name=SERVICE_NAME)
        broker.add_middleware(invalid_event_middleware(broker))
        vault = self._vault_client or NatsVaultClient(
            lambda: broker.connection, key, timeout=settings.vault_request_timeout
        )
        self.injector = CredentialInjector(
            vault=vault,
            backends=self._backends,
            publisher=BrokerPublisher(broker),
            default_mode=settings.default_mode,
            retry=RetryPolicy(
                max_deliver=settings.max_deliver,
                base_delay=settings.retry_base_delay,
                max_delay=settings.retry_max_delay,
            ),
        )
        register_handlers(broker, self.injector, settings)
        try:
            await broker.connect()
            await provision(broker, settings)
            await ensure_consumer(
                broker, created_consumer_config(max_deliver=settings.max_deliver, ack_wait=settings.ack_wait)
            )
            await broker.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await broker.stop()
            raise
        self.broker = broker
        log.info(
            "sandbox.started",
            key_id=key.key_id,
            backends=sorted(self._backends),
            local_root=str(settings.local_sandbox_root),
            default_mode=settings.default_mode,
        )

    async def stop(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            await broker.stop()
            log.info("sandbox.stopped")

    async def __aenter__(self) -> SandboxService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve(settings: SandboxSettings) -> None:
    """Run the service until cancelled or SIGTERM/SIGINT, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    try:
        async with SandboxService(settings):
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main() -> None:
    settings = SandboxSettings()
    configure_logging(settings.log_level, settings.log_format, service=SERVICE_NAME)
    asyncio.run(serve(settings))
