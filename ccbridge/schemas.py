"""JSON Schemas of every bus message, generated from the pydantic models in `shared.events`.

`python -m ccbridge.schemas` rewrites docs/schemas/v<N>/; a test fails when they are stale.
Non-Python publishers validate their payloads against these files. Version 1 holds every event
and the version-1 requests; version 2 holds what changed shape in version 2 (the batched
`vault.credentials.get`), both versions being accepted on the same subject.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from shared import subjects
from shared.events import (
    EVENT_MODELS,
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsReply,
    CredentialsRequest,
    GrantsListReply,
    GrantsListRequest,
)

SCHEMA_ROOT = Path(__file__).resolve().parent.parent / "docs" / "schemas"
SCHEMA_DIR = SCHEMA_ROOT / "v1"


def all_models() -> dict[str, type[BaseModel]]:
    """`v<N>/<name>` → model."""
    models: dict[str, type[BaseModel]] = {f"v1/{subject}": model for subject, model in EVENT_MODELS.items()}
    models[f"v1/{subjects.VAULT_CREDENTIALS_GET}.request"] = CredentialsRequest
    models[f"v1/{subjects.VAULT_CREDENTIALS_GET}.reply"] = CredentialsReply
    models[f"v1/{subjects.VAULT_CONNECTIONS_STATUS}.request"] = ConnectionStatusRequest
    models[f"v1/{subjects.VAULT_CONNECTIONS_STATUS}.reply"] = ConnectionStatusReply
    models[f"v1/{subjects.VAULT_GRANTS_LIST}.request"] = GrantsListRequest
    models[f"v1/{subjects.VAULT_GRANTS_LIST}.reply"] = GrantsListReply
    models[f"v2/{subjects.VAULT_CREDENTIALS_GET}.request"] = CredentialsBatchRequest
    models[f"v2/{subjects.VAULT_CREDENTIALS_GET}.reply"] = CredentialsBatchReply
    return models


def schema_for(name: str, model: type[BaseModel]) -> dict:
    version, _, subject = name.partition("/")
    schema = model.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://ccbridge.dev/schemas/{name}.json",
        "x-subject": subject.removesuffix(".request").removesuffix(".reply"),
        "x-schema-version": int(version.removeprefix("v")),
        **schema,
    }


def render() -> dict[str, str]:
    """`v<N>/<name>.json` → text."""
    return {
        f"{name}.json": json.dumps(schema_for(name, model), indent=2, sort_keys=True) + "\n"
        for name, model in sorted(all_models().items())
    }


def write_documents(documents: dict[str, str], root: Path) -> list[Path]:
    """Write rendered documents (relative path → text) under `root`; the paths written."""
    written = []
    for relative, text in documents.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def regenerate(documents: dict[str, str], default_root: Path) -> None:
    """`python -m …`: write the documents (under argv[1], else the committed place), print where."""
    for path in write_documents(documents, Path(sys.argv[1]) if len(sys.argv) > 1 else default_root):
        print(path)


if __name__ == "__main__":
    regenerate(render(), SCHEMA_ROOT)
