"""Composition root of the vault: loads key material once, wires the store, the use cases and
the bus. `python -m services.vault` (or `ccbridge vault`) runs `main()`.

Nothing here connects at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from types import TracebackType
from typing import Self

from faststream.nats import NatsBroker
from nats.js.errors import BadRequestError

from services.vault.adapters.store import SqlStore
from services.vault.handlers import build_credentials_router, build_tokens_router, tokens_consumer_config
from services.vault.keyring import Keyring, load_or_create_keyring
from services.vault.ports import Store, UnitOfWork
from services.vault.settings import VaultSettings
from services.vault.trust import TrustedRequesters
from services.vault.use_cases import Vault
from shared import subjects
from shared.broker import make_broker, provision
from shared.logging import configure_logging, get_logger
from shared.sealing import KeyPair, key_paths, load_or_create_keypair

log = get_logger(__name__)


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


class VaultService:
    """`async with VaultService(settings) as vault: ...` — or start()/stop()."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        store: Store | None = None,
        keyring: Keyring | None = None,
        keypair: KeyPair | None = None,
        trusted: TrustedRequesters | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._owns_store = store is None
        self._keyring = keyring
        self._keypair = keypair
        self._trusted = trusted
        self.vault: Vault | None = None
        self.broker: NatsBroker | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"VaultService(started={self._started}, store={self._store!r})"

    @property
    def store(self) -> Store:
        assert self._store is not None, "VaultService not started"
        return self._store

    @property
    def keypair(self) -> KeyPair:
        assert self._keypair is not None, "VaultService not started"
        return self._keypair

    def unit_of_work(self) -> UnitOfWork:
        assert self._store is not None and self._keyring is not None, "VaultService not started"
        return self._store.unit_of_work(self._keyring)

    async def start(self) -> None:
        if self._started:
            return
        settings = self.settings
        try:
            # Key material: loaded once here, never per message.
            self._keypair = self._keypair or load_keypair(settings)
            self._keyring = self._keyring or load_or_create_keyring(
                settings.keys_dir, env_value=settings.keks.get_secret_value() if settings.keks else None
            )
            self._trusted = self._trusted or TrustedRequesters.load(settings.trusted_requester_keys, settings.keys_dir)
            if self._store is None:
                self._store = SqlStore.from_url(
                    settings.database_url.get_secret_value(), schema=settings.database_schema, echo=settings.db_echo
                )
            await self._store.create_all()

            self.vault = Vault(unit_of_work=self.unit_of_work, keypair=self._keypair, trusted=self._trusted)
            broker = make_broker(settings, name="vault")
            broker.include_router(build_tokens_router(self.vault, settings))
            broker.include_router(build_credentials_router(self.vault))
            self.broker = broker
            await broker.connect()
            await provision(broker, settings)
            await self._ensure_consumer(broker)
            await broker.start()
        except BaseException:
            await self._close()
            raise
        self._started = True
        log.info(
            "vault started",
            key_id=self._keypair.key_id,
            kek_id=self._keyring.active_kek_id,
            trusted_requesters=len(self._trusted),
        )

    async def _ensure_consumer(self, broker: NatsBroker) -> None:
        """Create the durable consumer, or bring an existing one's config up to date
        (pull_subscribe alone would keep whatever config it was first created with)."""
        js = broker.connection.jetstream()
        config = tokens_consumer_config(self.settings)
        config.name = subjects.VAULT_TOKENS_ISSUED_DURABLE
        try:
            await js.add_consumer(subjects.TOKENS_STREAM.name, config=config)
        except BadRequestError as exc:  # e.g. a setting that cannot change on a live consumer
            log.warning("durable consumer config not updated", durable=config.durable_name, error=exc.description)

    async def stop(self) -> None:
        await self._close()
        if self._started:
            log.info("vault stopped")
        self._started = False

    async def _close(self) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            try:
                await broker.stop()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.warning("broker did not stop cleanly", exc_info=True)
        if self._store is not None and self._owns_store:
            with contextlib.suppress(Exception):
                await self._store.dispose()
            self._store = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def serve(settings: VaultSettings) -> None:
    """Run until cancelled or SIGTERM/SIGINT, then stop cleanly."""
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
        async with VaultService(settings):
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main() -> None:
    settings = VaultSettings()
    configure_logging(settings.log_level, settings.log_format, service="vault")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))
