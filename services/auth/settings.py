"""Settings of the auth service. Env names are public (design.md); see docs for the extras."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

DEFAULT_SCOPES = "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(hide_input_in_errors=True)

    host: str = Field(default="127.0.0.1", validation_alias="AUTH_HOST")
    port: int = Field(default=8000, ge=0, le=65535, validation_alias="AUTH_PORT", description="0 = a free port.")
    jwt_secret: SecretStr | None = Field(
        default=None,
        validation_alias="AUTH_JWT_SECRET",
        description="HS256 key of caller tokens (>= 32 chars). Unset: a dev secret in <keys_dir>/auth-jwt.secret.",
    )
    jwt_audience: str | None = Field(
        default=None, validation_alias="AUTH_JWT_AUDIENCE", description="If set, caller tokens must carry this `aud`."
    )
    oauth_authorize_url: str = Field(
        default="https://claude.com/cai/oauth/authorize", validation_alias="OAUTH_AUTHORIZE_URL"
    )
    oauth_token_url: str = Field(default="https://platform.claude.com/v1/oauth/token", validation_alias="OAUTH_TOKEN_URL")
    oauth_redirect_uri: str = Field(
        default="https://platform.claude.com/oauth/code/callback", validation_alias="OAUTH_REDIRECT_URI"
    )
    oauth_client_id: str = Field(default="9d1c250a-e61b-44d9-88ed-5944d1962f5e", validation_alias="OAUTH_CLIENT_ID")
    oauth_scopes: str = Field(default=DEFAULT_SCOPES, validation_alias="OAUTH_SCOPES", description="Space separated.")
    oauth_http_timeout: float = Field(default=10.0, gt=0, le=300, validation_alias="OAUTH_HTTP_TIMEOUT")
    vault_public_key: str | None = Field(
        default=None,
        validation_alias="VAULT_PUBLIC_KEY",
        description="base64url X25519 key of the vault. Unset: <keys_dir>/vault.hpke.pub, read when needed.",
    )
    login_ttl_s: int = Field(
        default=600, ge=30, le=3600, validation_alias="AUTH_LOGIN_TTL", description="Life of a pending login (s)."
    )

    @field_validator("jwt_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("AUTH_JWT_SECRET must be at least 32 characters (HS256 needs a 256-bit key)")
        return value

    @field_validator("oauth_scopes")
    @classmethod
    def _scopes_present(cls, value: str) -> str:
        if "user:inference" not in value.split():
            raise ValueError("OAUTH_SCOPES must contain user:inference (Claude Code cannot work without it)")
        return " ".join(value.split())

    @field_validator("vault_public_key", "jwt_audience", "jwt_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.oauth_scopes.split())
