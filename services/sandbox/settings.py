"""Settings of the sandbox service (env names are public: see design.md / docs)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from shared.events import CredentialMode
from shared.settings import ServiceSettings


class SandboxSettings(ServiceSettings):
    local_sandbox_root: Path = Field(
        default=Path("./var/sandboxes"),
        validation_alias="LOCAL_SANDBOX_ROOT",
        description="Local backend: the home of sandbox <id> is <root>/<id>.",
    )
    hpke_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="SANDBOX_HPKE_PRIVATE_KEY",
        description="base64url X25519 private key; else <keys_dir>/sandbox.hpke.key (created on first start).",
    )
    default_mode: CredentialMode = Field(
        default="file",
        validation_alias="SANDBOX_DEFAULT_MODE",
        description="Credential mode when sandbox.created carries no options.mode.",
    )
    vault_request_timeout: float = Field(
        default=2.0, gt=0, le=60, validation_alias="VAULT_REQUEST_TIMEOUT", description="Seconds."
    )
    max_deliver: int = Field(
        default=5,
        ge=1,
        le=100,
        validation_alias="SANDBOX_MAX_DELIVER",
        description="Deliveries of one sandbox.created before it is dead-lettered.",
    )
    retry_base_delay: float = Field(
        default=1.0,
        ge=0,
        le=600,
        validation_alias="SANDBOX_RETRY_BASE_DELAY",
        description="First redelivery delay (s); doubles per delivery.",
    )
    retry_max_delay: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="SANDBOX_RETRY_MAX_DELAY", description="Cap of the delay (s)."
    )
    ack_wait: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias="SANDBOX_ACK_WAIT",
        description="JetStream ack wait (s) of the sandbox.created consumer.",
    )
    concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        validation_alias="SANDBOX_CONCURRENCY",
        description="sandbox.created messages fetched and handled at once.",
    )
