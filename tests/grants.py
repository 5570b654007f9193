"""A grant authority for tests: one Ed25519 key per test process, trusted by the vaults the
tests build (`VAULT_GRANT_PUBLIC_KEYS` for service processes, `verifier()` in process), and
`grant_for()` to sign what auth would sign for a person and a sandbox."""

from __future__ import annotations

import time
from typing import Any

from shared.events import SandboxCreated
from shared.grants import GrantSigner, GrantVerifier

SIGNER = GrantSigner.generate()
PUBLIC_KEY = SIGNER.public_b64


def grant_for(user_id: str, sandbox_id: str, mode: str = "file", *, ttl_s: int = 3600,
              now_s: float | None = None, signer: GrantSigner = SIGNER) -> str:
    token, _ = signer.sign(user_id=user_id, sandbox_id=sandbox_id, mode=mode, ttl_s=ttl_s,
                           now_s=int(now_s if now_s is not None else time.time()))
    return token


def verifier() -> GrantVerifier:
    return GrantVerifier([SIGNER.public_key])


def env() -> dict[str, str]:
    """What a vault process needs to trust this authority."""
    return {"VAULT_GRANT_PUBLIC_KEYS": PUBLIC_KEY}


def sandbox_created(**fields: Any) -> SandboxCreated:
    """`SandboxCreated(**fields)` carrying a grant of the test authority for its person and
    sandbox (allowing every mode), as a platform would publish it — unless `grant` is given."""
    if "grant" not in fields:
        fields["grant"] = grant_for(fields["user_id"], fields["sandbox_id"], "file")
    return SandboxCreated(**fields)
