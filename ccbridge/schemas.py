"""JSON Schemas of every bus message, generated from the pydantic models in `shared.events`.

`python -m ccbridge.schemas` rewrites docs/schemas/v<N>/; a test fails when they are stale.
Non-Python publishers validate their payloads against these files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shared import subjects
from shared.events import (
    EVENT_MODELS,
    SCHEMA_VERSION,
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsReply,
    CredentialsRequest,
    GrantsListReply,
    GrantsListRequest,
)

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas" / f"v{SCHEMA_VERSION}"


def all_models() -> dict[str, type[BaseModel]]:
    models: dict[str, type[BaseModel]] = dict(EVENT_MODELS)
    models[f"{subjects.VAULT_CREDENTIALS_GET}.request"] = CredentialsRequest
    models[f"{subjects.VAULT_CREDENTIALS_GET}.reply"] = CredentialsReply
    models[f"{subjects.VAULT_CONNECTIONS_STATUS}.request"] = ConnectionStatusRequest
    models[f"{subjects.VAULT_CONNECTIONS_STATUS}.reply"] = ConnectionStatusReply
    models[f"{subjects.VAULT_GRANTS_LIST}.request"] = GrantsListRequest
    models[f"{subjects.VAULT_GRANTS_LIST}.reply"] = GrantsListReply
    return models


def schema_for(name: str, model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ccbridge.dev/schemas/v{SCHEMA_VERSION}/{name}.json",
        "x-subject": name.removesuffix(".request").removesuffix(".reply"),
        **schema,
    }


def render() -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(schema_for(name, model), indent=2, sort_keys=True) + "\n"
        for name, model in sorted(all_models().items())
    }


def write(target: Path = SCHEMA_DIR) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render().items():
        path = target / filename
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(path)
