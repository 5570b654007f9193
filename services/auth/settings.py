"""Settings of the auth service. Env names are public (design.md); the extras are in docs/auth.md."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.grants import MAX_TTL_S as MAX_GRANT_TTL_S
from shared.grants import GrantError, GrantSigner
from shared.oauth import CLAUDE_CODE_CLIENT_ID, DEFAULT_TOKEN_URLS, SEED_TOKEN_URL, TOKEN_URL, parse_token_urls
from shared.oauth import token_urls as ordered_token_urls
from shared.settings import ServiceSettings

DEFAULT_SCOPES = "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"
CURRENT_TOKEN_URL = TOKEN_URL
__all__ = ["AuthSettings", "CURRENT_TOKEN_URL", "DEFAULT_SCOPES", "DEFAULT_TOKEN_URLS", "SEED_TOKEN_URL"]
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    host: str = Field(default="127.0.0.1", validation_alias="AUTH_HOST")
    port: int = Field(default=8000, ge=0, le=65535, validation_alias="AUTH_PORT", description="0 = a free port.")

    # --- caller authentication -----------------------------------------------------------
    jwt_secret: SecretStr | None = Field(
        default=None,
        validation_alias="AUTH_JWT_SECRET",
        description="HS256 key of caller tokens (>= 32 chars). Unset and no public key/JWKS: a dev secret "
        "in <keys_dir>/auth-jwt.secret.",
    )
    jwt_public_key: str | None = Field(
        default=None,
        validation_alias="AUTH_JWT_PUBLIC_KEY",
        description="PEM public key (RSA, EC or Ed25519) of caller tokens, or the path of a PEM file.",
    )
    jwks_url: str | None = Field(
        default=None, validation_alias="AUTH_JWKS_URL", description="JWKS URL of the caller tokens' issuer."
    )
    jwt_algorithms: str = Field(
        default=",".join(ASYMMETRIC_ALGORITHMS),
        validation_alias="AUTH_JWT_ALGORITHMS",
        description="Asymmetric algorithms accepted with AUTH_JWT_PUBLIC_KEY / AUTH_JWKS_URL (comma separated).",
    )
    jwt_audience: str | None = Field(
        default=None, validation_alias="AUTH_JWT_AUDIENCE", description="If set, caller tokens must carry this `aud`."
    )
    jwt_issuer: str | None = Field(
        default=None, validation_alias="AUTH_JWT_ISSUER", description="If set, caller tokens must carry this `iss`."
    )
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=600, validation_alias="AUTH_JWT_LEEWAY")
    jwks_cache_s: float = Field(default=300.0, gt=0, le=86400, validation_alias="AUTH_JWKS_CACHE_TTL")
    jwks_timeout: float = Field(default=5.0, gt=0, le=60, validation_alias="AUTH_JWKS_TIMEOUT")
    jwks_cooldown_s: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="AUTH_JWKS_REFRESH_COOLDOWN",
        description="A token with an unknown `kid` refetches the JWKS at most once per this many seconds.",
    )
    state_secret: SecretStr | None = Field(
        default=None,
        validation_alias="AUTH_STATE_SECRET",
        description="Key (>= 32 chars) that encrypts pending logins in NATS KV; every replica needs the same. "
        "Unset: AUTH_JWT_SECRET, else the dev secret file.",
    )

    # --- OAuth ---------------------------------------------------------------------------
    oauth_authorize_url: str = Field(
        default="https://claude.com/cai/oauth/authorize", validation_alias="OAUTH_AUTHORIZE_URL"
    )
    oauth_console_authorize_url: str = Field(
        default="https://platform.claude.com/oauth/authorize", validation_alias="OAUTH_CONSOLE_AUTHORIZE_URL"
    )
    oauth_token_url: str | None = Field(
        default=None, validation_alias="OAUTH_TOKEN_URL", description="If set, tried first (before OAUTH_TOKEN_URLS)."
    )
    oauth_token_urls: str = Field(
        default=DEFAULT_TOKEN_URLS,
        validation_alias="OAUTH_TOKEN_URLS",
        description="Token endpoints tried in order when one answers 404 (comma separated).",
    )
    oauth_redirect_uri: str = Field(
        default="https://platform.claude.com/oauth/code/callback", validation_alias="OAUTH_REDIRECT_URI"
    )
    oauth_legacy_redirect_uri: str | None = Field(
        default=None,
        validation_alias="OAUTH_LEGACY_REDIRECT_URI",
        description="redirect_uri of `POST /user-settings/mcp/claude-code` exchanges. Unset: OAUTH_REDIRECT_URI.",
    )
    oauth_client_id: str = Field(default=CLAUDE_CODE_CLIENT_ID, validation_alias="OAUTH_CLIENT_ID")
    oauth_scopes: str = Field(default=DEFAULT_SCOPES, validation_alias="OAUTH_SCOPES", description="Space separated.")
    oauth_http_timeout: float = Field(default=10.0, gt=0, le=300, validation_alias="OAUTH_HTTP_TIMEOUT")

    # --- dependencies --------------------------------------------------------------------
    vault_public_key: str | None = Field(
        default=None,
        validation_alias="VAULT_PUBLIC_KEY",
        description="base64url X25519 key of the vault. Unset: <keys_dir>/vault.hpke.pub, read when needed.",
    )
    vault_timeout: float = Field(
        default=3.0, gt=0, le=60, validation_alias="AUTH_VAULT_TIMEOUT",
        description="How long GET /v1/claude-code/status waits for the vault (s).",
    )

    # --- grants (shared/grants.py) ---------------------------------------------------------
    grant_private_key: SecretStr | None = Field(
        default=None,
        validation_alias="AUTH_GRANT_PRIVATE_KEY",
        description="Auth's grant signing key: base64url raw Ed25519 private key (32 bytes). Unset: "
        "<keys_dir>/auth.grant.key, created on first start, with auth.grant.pub beside it for the vault.",
    )
    grant_max_ttl_s: int = Field(
        default=7 * 86_400, ge=60, le=MAX_GRANT_TTL_S, validation_alias="GRANT_MAX_TTL_S",
        description="Longest lease a grant may give (s). A request without ttl_s gets min(86400, this).",
    )

    # --- logins and abuse limits ---------------------------------------------------------
    login_ttl_s: int = Field(
        default=600, ge=30, le=3600, validation_alias="AUTH_LOGIN_TTL", description="Life of a pending login (s)."
    )
    login_code_attempts: int = Field(
        default=3, ge=1, le=10, validation_alias="AUTH_LOGIN_CODE_ATTEMPTS",
        description="Pastes of one login the token endpoint may refuse with invalid_grant (a typo) before the "
        "login is used up.",
    )
    max_pending_logins: int = Field(
        default=5, ge=1, le=100, validation_alias="AUTH_MAX_PENDING_LOGINS",
        description="Live pending logins one caller may hold.",
    )
    rate_limit_per_minute: float = Field(
        default=20.0, gt=0, le=100_000, validation_alias="AUTH_RATE_LIMIT_PER_MINUTE",
        description="Sustained connect requests per caller and minute (per replica).",
    )
    rate_limit_burst: int = Field(
        default=10, ge=1, le=100_000, validation_alias="AUTH_RATE_LIMIT_BURST",
        description="Connect requests a caller may make at once before the rate applies.",
    )
    read_rate_limit_per_minute: float = Field(
        default=120.0, gt=0, le=100_000, validation_alias="AUTH_READ_RATE_LIMIT_PER_MINUTE",
        description="Sustained GET /v1/claude-code/status and GET /v1/claude-code/grants per caller and minute "
        "(each its own bucket, per replica).",
    )
    read_rate_limit_burst: int = Field(
        default=30, ge=1, le=100_000, validation_alias="AUTH_READ_RATE_LIMIT_BURST",
        description="Status and grant-list requests a caller may make at once.",
    )
    grant_rate_limit_per_minute: float = Field(
        default=60.0, gt=0, le=100_000, validation_alias="AUTH_GRANT_RATE_LIMIT_PER_MINUTE",
        description="Sustained grants issued, and grants ended, per caller and minute (each its own bucket).",
    )
    grant_rate_limit_burst: int = Field(
        default=30, ge=1, le=100_000, validation_alias="AUTH_GRANT_RATE_LIMIT_BURST",
        description="Grants a caller may have issued (or ended) at once, e.g. for a batch of sandboxes.",
    )
    max_body_bytes: int = Field(default=16_384, ge=1024, le=1_048_576, validation_alias="AUTH_MAX_BODY_BYTES")
    connect_frame_ancestors: str = Field(
        default="'self'",
        validation_alias="AUTH_CONNECT_FRAME_ANCESTORS",
        description="CSP frame-ancestors of GET /connect (origins allowed to embed the page).",
    )

    @field_validator("jwt_secret", "state_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("secrets must be at least 32 characters (HS256 needs a 256-bit key)")
        return value

    @field_validator("grant_private_key")
    @classmethod
    def _grant_key_is_ed25519(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                GrantSigner.from_b64(value.get_secret_value())
            except GrantError:
                raise ValueError("AUTH_GRANT_PRIVATE_KEY must be a base64url raw Ed25519 private key (32 bytes)") from None
        return value

    @field_validator("oauth_scopes")
    @classmethod
    def _scopes_present(cls, value: str) -> str:
        if "user:inference" not in value.split():
            raise ValueError("OAUTH_SCOPES must contain user:inference (Claude Code cannot work without it)")
        return " ".join(value.split())

    @field_validator("jwt_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        wrong = [name for name in names if name not in ASYMMETRIC_ALGORITHMS]
        if not names or wrong:
            raise ValueError(f"AUTH_JWT_ALGORITHMS takes asymmetric algorithms only ({', '.join(ASYMMETRIC_ALGORITHMS)})")
        return ",".join(names)

    @field_validator("oauth_token_urls")
    @classmethod
    def _urls(cls, value: str) -> str:
        return parse_token_urls(value)

    @field_validator(
        "vault_public_key", "jwt_audience", "jwt_issuer", "jwt_secret", "state_secret", "jwt_public_key", "jwks_url",
        "oauth_token_url", "oauth_legacy_redirect_uri", "grant_private_key",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _jwks_is_http(self) -> AuthSettings:
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("AUTH_JWKS_URL must be an http(s) URL")
        return self

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.oauth_scopes.split())

    @property
    def token_urls(self) -> tuple[str, ...]:
        """OAUTH_TOKEN_URL (if set) first, then OAUTH_TOKEN_URLS, without repeats (shared/oauth.py)."""
        return ordered_token_urls(self.oauth_token_url, self.oauth_token_urls)

    @property
    def legacy_redirect_uri(self) -> str:
        return self.oauth_legacy_redirect_uri or self.oauth_redirect_uri

    @property
    def asymmetric_algorithms(self) -> tuple[str, ...]:
        return tuple(self.jwt_algorithms.split(","))

    @property
    def asymmetric_configured(self) -> bool:
        return self.jwt_public_key is not None or self.jwks_url is not None
