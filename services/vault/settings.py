"""Vault settings (env names are public: see design.md and docs/)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from shared.settings import ServiceSettings

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/vault.db"


class VaultSettings(ServiceSettings):
    database_url: SecretStr = Field(
        default=SecretStr(DEFAULT_DATABASE_URL),
        validation_alias="DATABASE_URL",
        description="sqlite+aiosqlite:///<file> or postgresql+asyncpg://user:pass@host/db (may hold a password).",
    )
    database_schema: str | None = Field(
        default=None,
        validation_alias="VAULT_DATABASE_SCHEMA",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="PostgreSQL only: keep the vault's tables in this schema (created if missing).",
    )
    hpke_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="VAULT_HPKE_PRIVATE_KEY",
        description="base64url X25519 private key; else <keys_dir>/vault.hpke.key (created on first start).",
    )
    keks: SecretStr | None = Field(
        default=None,
        validation_alias="VAULT_KEKS",
        description='{"active":"<kid>","keys":{"<kid>":"<base64url 32 bytes>"}}; else <keys_dir>/vault-kek.json.',
    )
    trusted_requester_keys: str = Field(
        default="",
        validation_alias="VAULT_TRUSTED_REQUESTER_KEYS",
        description="Comma-separated base64url X25519 public keys allowed to fetch credentials "
        "(plus <keys_dir>/sandbox*.hpke.pub found at start).",
    )
    # tokens.issued consumer
    fetch_batch: int = Field(default=16, ge=1, le=256, validation_alias="VAULT_FETCH_BATCH")
    fetch_timeout_s: float = Field(default=2.0, gt=0, le=60, validation_alias="VAULT_FETCH_TIMEOUT_S")
    ack_wait_s: float = Field(default=30.0, gt=0, validation_alias="VAULT_ACK_WAIT_S")
    retry_max_delay_s: float = Field(
        default=30.0, gt=0, validation_alias="VAULT_RETRY_MAX_DELAY_S",
        description="Cap of the backoff between redeliveries while the database is unavailable.",
    )
    poison_after: int = Field(
        default=5, ge=1, validation_alias="VAULT_POISON_AFTER",
        description="Dead-letter a message after this many deliveries that failed unexpectedly.",
    )
    db_echo: bool = Field(default=False, validation_alias="VAULT_DB_ECHO")

    @field_validator("hpke_private_key", "keks", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value
