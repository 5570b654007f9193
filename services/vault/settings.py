"""Vault settings (env names are public: see design.md and docs/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from shared.oauth import CLAUDE_CODE_CLIENT_ID, DEFAULT_TOKEN_URLS, TOKEN_URL, parse_token_urls, primary_token_url
from shared.settings import ServiceSettings

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/vault.db"
DEFAULT_TOKEN_URL = TOKEN_URL
DEFAULT_CLIENT_ID = CLAUDE_CODE_CLIENT_ID


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
        description='{"active":"<kid>","keys":{"<kid>":"<base64url 32 bytes>"},"retired":{…}}; '
        "else the KEK file (VAULT_KEK_FILE).",
    )
    kek_file: Path | None = Field(
        default=None,
        validation_alias="VAULT_KEK_FILE",
        description="KEK file (0600, created with one random key if missing); default <keys_dir>/vault-kek.json.",
    )
    kek_check_interval_s: float = Field(
        default=2.0, gt=0, le=3600, validation_alias="VAULT_KEK_CHECK_INTERVAL_S",
        description="How often a running vault stats the KEK file for changes (rotation by another process).",
    )
    trusted_requester_keys: str = Field(
        default="",
        validation_alias="VAULT_TRUSTED_REQUESTER_KEYS",
        description="Comma-separated base64url X25519 public keys allowed to fetch credentials "
        "(plus <keys_dir>/sandbox*.hpke.pub, re-read when an unknown key asks).",
    )
    trust_reload_min_interval_s: float = Field(
        default=1.0, ge=0, le=3600, validation_alias="VAULT_TRUST_RELOAD_MIN_INTERVAL_S",
        description="At most one re-read of the trusted keys per this many seconds on unknown keys.",
    )
    request_timeout_s: float = Field(
        default=1.5, gt=0, le=60, validation_alias="VAULT_REQUEST_TIMEOUT_S",
        description="Latency budget of one vault.credentials.get; over it the answer is `unavailable`.",
    )
    audit_grants: bool = Field(
        default=True, validation_alias="VAULT_AUDIT_GRANTS",
        description="Audit every credential release/refusal (batched, best effort).",
    )
    # refresher
    # The same two settings as auth, read the same way (shared/oauth.py): the vault refreshes and
    # revokes at the endpoint auth exchanges with — OAUTH_TOKEN_URL if set, else the first of
    # OAUTH_TOKEN_URLS (`token_url`).
    oauth_token_url: str | None = Field(
        default=None, validation_alias="OAUTH_TOKEN_URL",
        description="If set, the token endpoint (refresh, revoke); else the first of OAUTH_TOKEN_URLS.",
    )
    oauth_token_urls: str = Field(
        default=DEFAULT_TOKEN_URLS, validation_alias="OAUTH_TOKEN_URLS",
        description="Auth's list of token endpoints (comma separated); the vault uses the first.",
    )
    oauth_client_id: str = Field(default=DEFAULT_CLIENT_ID, validation_alias="OAUTH_CLIENT_ID")
    refresh_enabled: bool = Field(default=True, validation_alias="VAULT_REFRESH_ENABLED")
    refresh_margin_s: float = Field(
        default=600.0, ge=0, validation_alias="VAULT_REFRESH_MARGIN_S",
        description="Refresh an access token this long before it expires.",
    )
    refresh_interval_s: float = Field(
        default=30.0, gt=0, le=3600, validation_alias="VAULT_REFRESH_INTERVAL_S",
        description="How often each replica scans for connections due for a refresh (±20 % jitter).",
    )
    refresh_timeout_s: float = Field(default=15.0, gt=0, le=300, validation_alias="VAULT_REFRESH_TIMEOUT_S")
    refresh_lease_s: float = Field(
        default=60.0, gt=0, le=3600, validation_alias="VAULT_REFRESH_LEASE_S",
        description="Single-flight lease per connection; must exceed VAULT_REFRESH_TIMEOUT_S.",
    )
    refresh_batch: int = Field(default=50, ge=1, le=10_000, validation_alias="VAULT_REFRESH_BATCH")
    refresh_concurrency: int = Field(default=4, ge=1, le=256, validation_alias="VAULT_REFRESH_CONCURRENCY")
    refresh_backoff_base_s: float = Field(default=15.0, gt=0, validation_alias="VAULT_REFRESH_BACKOFF_BASE_S")
    refresh_backoff_max_s: float = Field(default=900.0, gt=0, validation_alias="VAULT_REFRESH_BACKOFF_MAX_S")
    login_warning_s: float = Field(
        default=3 * 24 * 3600.0, ge=0, validation_alias="VAULT_LOGIN_WARNING_S",
        description="Publish tokens.login_expiring this long before a login lapses.",
    )
    # housekeeping
    maintenance_interval_s: float = Field(default=3600.0, gt=0, validation_alias="VAULT_MAINTENANCE_INTERVAL_S")
    processed_events_retention_s: float = Field(
        default=35 * 24 * 3600.0, gt=0, validation_alias="VAULT_PROCESSED_EVENTS_RETENTION_S",
        description="Keep processed event ids (and revocation tombstones) this long: longer than "
        "the streams keep messages (7 d) and the dead letters (30 d), so replays stay deduplicated.",
    )
    audit_retention_s: float = Field(
        default=365 * 24 * 3600.0, ge=0, validation_alias="VAULT_AUDIT_RETENTION_S",
        description="Audit entries older than this are deleted (default one year); 0 = keep forever.",
    )
    # grants (leases of credentials to sandboxes)
    grants: Literal["required", "off"] = Field(
        default="required", validation_alias="CCBRIDGE_GRANTS",
        description="required: credentials leave only for a sandbox the person granted (a signed, unexpired "
        "grant). off: no grant is checked — for migrating platforms only; warned about at every start.",
    )
    grant_public_keys: str = Field(
        default="", validation_alias="VAULT_GRANT_PUBLIC_KEYS",
        description="Comma-separated base64url Ed25519 public keys of auth's grant key (several during a "
        "rotation), plus <keys_dir>/auth.grant.pub when present.",
    )
    lease_sweep_interval_s: float = Field(
        default=5.0, gt=0, le=3600, validation_alias="VAULT_LEASE_SWEEP_INTERVAL_S",
        description="How often expired leases are ended and announced (grants.ended → the sandbox is scrubbed).",
    )
    lease_retention_s: float = Field(
        default=35 * 24 * 3600.0, gt=0, validation_alias="VAULT_LEASE_RETENTION_S",
        description="Ended leases are kept this long (a grant signed before the end stays void meanwhile).",
    )
    revoke_attempts: int = Field(
        default=3, ge=1, le=10, validation_alias="VAULT_REVOKE_ATTEMPTS",
        description="Disconnect: tries at revoking the login at the OAuth server (1 s, 2 s, … apart).",
    )
    migrate_on_start: bool = Field(default=True, validation_alias="VAULT_MIGRATE_ON_START")
    db_pool_timeout_s: float = Field(default=5.0, gt=0, validation_alias="VAULT_DB_POOL_TIMEOUT_S")
    # metrics + health
    metrics_host: str = Field(default="127.0.0.1", validation_alias="VAULT_METRICS_HOST")
    metrics_port: int = Field(
        default=9100, ge=0, le=65535, validation_alias="VAULT_METRICS_PORT",
        description="/metrics, /healthz, /readyz; 0 = disabled.",
    )
    instance_id: str | None = Field(
        default=None, validation_alias="VAULT_INSTANCE_ID", max_length=64,
        description="Name of this replica in leases and audit entries; default <host>-<pid>-<random>.",
    )
    # vault.credentials.get
    request_concurrency: int = Field(
        default=16, ge=1, le=1024, validation_alias="VAULT_REQUEST_CONCURRENCY",
        description="Credential requests served at once by one replica. When not set and the database is "
        "SQLite, 1: a grant's read is one short worker-thread call, and FastStream's concurrent subscriber "
        "costs more CPU than it overlaps (measured on 2 cores: 879 grants/s at 1, 685/s at 2, 752/s at 4).",
    )
    # tokens.issued consumer
    fetch_batch: int = Field(
        default=16, ge=1, le=256, validation_alias="VAULT_FETCH_BATCH",
        description="Messages fetched per pull. tokens.issued stores each fetched batch in one transaction, "
        "so it always fetches this many. The other consumers write one transaction per message: when not set "
        "and the database is SQLite they fetch 1 (SQLite has one writer; concurrent write transactions only "
        "contend for its lock).",
    )
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

    @model_validator(mode="after")
    def _lease_outlives_the_call(self) -> VaultSettings:
        if self.refresh_lease_s <= self.refresh_timeout_s:
            raise ValueError("VAULT_REFRESH_LEASE_S must be larger than VAULT_REFRESH_TIMEOUT_S")
        return self

    @field_validator("oauth_token_urls")
    @classmethod
    def _token_urls(cls, value: str) -> str:
        return parse_token_urls(value)

    @field_validator("oauth_token_url", mode="before")
    @classmethod
    def _blank_token_url(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def token_url(self) -> str:
        """Where the vault refreshes and revokes (see shared.oauth.primary_token_url)."""
        return primary_token_url(self.oauth_token_url, self.oauth_token_urls)

    @property
    def _sqlite(self) -> bool:
        return self.database_url.get_secret_value().startswith("sqlite")

    @property
    def effective_fetch_batch(self) -> int:
        if "fetch_batch" not in self.model_fields_set and self._sqlite:
            return 1
        return self.fetch_batch

    @property
    def issued_fetch_batch(self) -> int:
        """tokens.issued: one transaction per fetched batch, whatever the database."""
        return self.fetch_batch

    @property
    def effective_request_concurrency(self) -> int:
        if "request_concurrency" not in self.model_fields_set and self._sqlite:
            return 1
        return self.request_concurrency

    @property
    def kek_path(self) -> Path:
        return self.kek_file or self.keys_dir / "vault-kek.json"

    @field_validator("hpke_private_key", "keks", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value
