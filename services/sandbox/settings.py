"""Settings of the sandbox service (env names are public: see design.md / docs)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from services.sandbox.domain import DEFAULT_MCP_PACKAGE
from shared.events import CredentialMode
from shared.settings import ServiceSettings


class SandboxSettings(ServiceSettings):
    local_sandbox_root: Path = Field(
        default=Path("./var/sandboxes"),
        validation_alias="LOCAL_SANDBOX_ROOT",
        description="Local backend: the home of sandbox <id> is <root>/<id>.",
    )
    local_fsync: bool = Field(
        default=False,
        validation_alias="SANDBOX_LOCAL_FSYNC",
        description="Local backend: also fsync each written file and its directory (survives a host crash; "
        "~4 ms per injection). Writes are atomic (temp file + rename) either way.",
    )
    hpke_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="SANDBOX_HPKE_PRIVATE_KEY",
        description="base64url X25519 private key; else <keys_dir>/sandbox.hpke.key (created on first start).",
    )
    default_mode: CredentialMode = Field(
        default="access_only",
        validation_alias="SANDBOX_DEFAULT_MODE",
        description="Credential mode when sandbox.created carries no options.mode. access_only (default) keeps "
        "the refresh token in the vault; file also writes it (and needs a grant that allows file).",
    )
    vault_request_timeout: float = Field(
        default=2.0, gt=0, le=60, validation_alias="VAULT_REQUEST_TIMEOUT", description="Seconds."
    )
    retry_window: float = Field(
        default=300.0,
        ge=0,
        le=7 * 24 * 3600,
        validation_alias="SANDBOX_RETRY_WINDOW_S",
        description="How long a message may keep failing for a retryable reason — while the vault or e2b is "
        "down it is held, otherwise redelivered with backoff — before it is reported failed (seconds since "
        "JetStream stored it; 0 = never give up).",
    )
    max_deliver: int = Field(
        default=0,
        ge=0,
        le=10_000,
        validation_alias="SANDBOX_MAX_DELIVER",
        description="Optional cap on the deliveries of a retryable failure that is not a dependency outage "
        "(0 = the window alone decides). A bug (an unexpected error) is final after 5 deliveries.",
    )
    breaker_probe: float = Field(
        default=1.0, gt=0, le=600, validation_alias="SANDBOX_BREAKER_PROBE_S",
        description="While the vault or e2b is down: first wait before one held message tries it again; "
        "doubles per failed try up to SANDBOX_BREAKER_MAX_PROBE_S.",
    )
    breaker_max_probe: float = Field(
        default=5.0, gt=0, le=3600, validation_alias="SANDBOX_BREAKER_MAX_PROBE_S",
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
        description="Messages of one consumer fetched and handled at once (per replica).",
    )
    live_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        validation_alias="SANDBOX_LIVE_CONCURRENCY",
        description="Sandboxes of one person re-injected / scrubbed at once (tokens.refreshed, tokens.revoked).",
    )
    tombstone_max_age: float = Field(
        default=86_400.0,
        ge=0,
        validation_alias="SANDBOX_TOMBSTONE_MAX_AGE",
        description="Seconds a sandbox.destroyed tombstone stays in the live-sandbox bucket (purged at start).",
    )
    env_file: str = Field(
        default=".config/ccbridge/env",
        min_length=1,
        max_length=256,
        validation_alias="SANDBOX_ENV_FILE",
        description="env mode: the file (relative to the sandbox home) holding `export CLAUDE_CODE_OAUTH_TOKEN=…`.",
    )
    mcp_package: str = Field(
        default=DEFAULT_MCP_PACKAGE,
        min_length=1,
        max_length=200,
        # an exact version: a range or a tag (`@latest`) would run whatever was published last
        pattern=r"^(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*@[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$",
        validation_alias="SANDBOX_MCP_PACKAGE",
        description="options.mcp: the npm package registered as stdio MCP server `claude-code-mcp` (npx -y <pkg>).",
    )

    # --- e2b backend (names follow the e2b SDK's own environment variables) -------------------
    e2b_api_key: SecretStr | None = Field(
        default=None, validation_alias="E2B_API_KEY", description="Sent as X-API-KEY; e2b is unavailable without it."
    )
    e2b_domain: str = Field(default="e2b.app", validation_alias="E2B_DOMAIN")
    e2b_api_url: str | None = Field(
        default=None, validation_alias="E2B_API_URL", description="Control-plane URL override (the stand-in)."
    )
    e2b_sandbox_url: str | None = Field(
        default=None, validation_alias="E2B_SANDBOX_URL", description="envd URL override (the stand-in)."
    )
    e2b_template: str = Field(
        default="base",
        min_length=1,
        max_length=128,
        validation_alias="E2B_TEMPLATE",
        description="Template used when sandbox.created has `template: \"\"`.",
    )
    e2b_request_timeout: float = Field(
        default=30.0, gt=0, le=600, validation_alias="E2B_REQUEST_TIMEOUT", description="Per request (s)."
    )
    e2b_sandbox_timeout: int = Field(
        default=3600,
        ge=1,
        le=86_400,
        validation_alias="E2B_SANDBOX_TIMEOUT",
        description="Lifetime (s) of a sandbox created from a template.",
    )
    e2b_request_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        validation_alias="E2B_REQUEST_RETRIES",
        description="SDK-level retries of control-plane calls answered 429/502/503/504.",
    )
    metrics_host: str = Field(default="127.0.0.1", validation_alias="SANDBOX_METRICS_HOST")
    metrics_port: int = Field(
        default=9101, ge=0, le=65535, validation_alias="SANDBOX_METRICS_PORT",
        description="/healthz, /readyz and /metrics listener; 0 = off.",
    )
