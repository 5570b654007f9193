"""pydantic-settings base shared by every service. Env names are public (design.md)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def nats_servers(url: str) -> list[str]:
    """`NATS_URL` may list several servers of a cluster, comma separated."""
    return [part.strip() for part in url.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """A NATS URL safe to print: a user name stays, a password or a token (`nats://<token>@…`)
    goes; each server of a comma-separated list."""
    def one(server: str) -> str:
        parts = urlsplit(server.strip())
        if "@" not in parts.netloc:
            return server.strip()
        who = f"{parts.username}:***" if parts.password is not None else "***"
        return urlunsplit(parts._replace(netloc=f"{who}@{parts.netloc.rpartition('@')[2]}"))

    return ",".join(one(server) for server in url.split(","))


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", populate_by_name=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias="NATS_URL")
    data_dir: Path = Field(default=Path("./var"), validation_alias="CCBRIDGE_DATA_DIR")
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")
    log_format: str = Field(default="console", validation_alias="LOG_FORMAT", description="console | json")
    stream_replicas: int = Field(default=1, validation_alias="CCBRIDGE_STREAM_REPLICAS", ge=1, le=5)
    stream_max_bytes: int = Field(
        default=1 << 30,
        validation_alias="CCBRIDGE_STREAM_MAX_BYTES",
        ge=1 << 20,
        description="Size cap of each ccbridge stream (bytes); when full, its oldest messages are dropped.",
    )

    nats_inbox_prefix: str | None = Field(
        default=None,
        validation_alias="NATS_INBOX_PREFIX",
        description="Reply-inbox prefix of this service's NATS connection; default `_INBOX.ccbridge-<service>`, "
        "the prefix deploy/nats/accounts.conf lets that service's user (and only it) subscribe to.",
    )

    @field_validator("nats_inbox_prefix")
    @classmethod
    def _plain_subject(cls, value: str | None) -> str | None:
        # nats-py appends `.<nuid>`: a wildcard, a space or a trailing dot would make inboxes
        # that are invalid subjects, or that a permission rule cannot name exactly.
        if not value:
            return None  # unset or empty: the service's default
        if not re.fullmatch(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*", value):
            raise ValueError("NATS_INBOX_PREFIX must be a plain subject like _INBOX.ccbridge-vault "
                             "(no *, >, spaces or trailing dot)")
        return value

    @property
    def nats_servers(self) -> list[str]:
        return nats_servers(self.nats_url)

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"
