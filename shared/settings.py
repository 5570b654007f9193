"""pydantic-settings base shared by every service. Env names are public (design.md)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def nats_servers(url: str) -> list[str]:
    """`NATS_URL` may list several servers of a cluster, comma separated."""
    return [part.strip() for part in url.split(",") if part.strip()]


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

    @property
    def nats_servers(self) -> list[str]:
        return nats_servers(self.nats_url)

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"
