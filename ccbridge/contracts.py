"""Published contracts, generated from the code: AsyncAPI for every service (FastStream builds
it from each service's real broker wiring: its subscribers and declared publishers) and OpenAPI
for auth (from its FastAPI app).

`python -m ccbridge.contracts` rewrites docs/asyncapi/*.json and docs/openapi/auth.json; a test
fails when the committed files are stale.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

DOCS = Path(__file__).resolve().parent.parent / "docs"
# A stable server in the documents (the real one comes from NATS_URL at run time).
DOC_ENV: dict[str, Any] = {"NATS_URL": "nats://nats:4222"}
VERSION = "1"


def _auth_broker() -> NatsBroker:
    from services.auth.app import build_broker
    from services.auth.settings import AuthSettings

    return build_broker(AuthSettings(**DOC_ENV))


def _vault_broker() -> NatsBroker:
    from services.vault.app import documentation_broker
    from services.vault.settings import VaultSettings

    return documentation_broker(VaultSettings(**DOC_ENV))


def _sandbox_broker() -> NatsBroker:
    from services.sandbox.app import build_broker
    from services.sandbox.settings import SandboxSettings

    return build_broker(SandboxSettings(**DOC_ENV))


BROKERS: dict[str, tuple[Callable[[], NatsBroker], str]] = {
    "auth": (_auth_broker, "Publishes sealed tokens after a person connects; asks the vault for status."),
    "vault": (_vault_broker, "Stores and refreshes tokens; answers sealed credential and status requests."),
    "sandbox": (_sandbox_broker, "Writes Claude Code credentials into sandboxes and reports the result."),
}


def asyncapi_documents() -> dict[str, str]:
    documents = {}
    for name, (build, description) in BROKERS.items():
        spec = AsyncAPI(build(), title=f"ccbridge {name}", version=VERSION, description=description)
        document = json.loads(spec.to_specification().to_json())
        documents[f"asyncapi/{name}.json"] = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return documents


def openapi_document() -> dict[str, str]:
    from services.auth.app import build_api

    return {"openapi/auth.json": json.dumps(build_api().openapi(), indent=2, sort_keys=True) + "\n"}


def render() -> dict[str, str]:
    return {**asyncapi_documents(), **openapi_document()}


if __name__ == "__main__":
    from ccbridge.schemas import regenerate

    regenerate(render(), DOCS)
