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
                           now_s=now_s if now_s is not None else time.time())
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


async def stack_grant(stack: Any, user_id: str, sandbox_id: str, mode: str | None = None) -> str:
    """The person's grant for a sandbox of a running `ccbridge.stack.Stack`: through auth's route
    with a dev caller token when the stack runs auth; otherwise signed with the key auth would
    use (`<data>/keys/auth.grant.key`, which the stack's vault trusts)."""
    from ccbridge.client import request_grant
    from ccbridge.demo import dev_jwt_secret, mint_caller_token
    from shared.grants import load_or_create_signer

    if "auth" in stack.services:
        secret = stack.service_env().get("AUTH_JWT_SECRET") or dev_jwt_secret(stack.data_dir / "keys")
        assert secret, "auth writes its dev secret at start"
        return (await request_grant(stack.auth_url, mint_caller_token(secret, user_id), sandbox_id,
                                    mode=mode)).token
    return grant_for(user_id, sandbox_id, mode or "access_only", signer=load_or_create_signer(stack.data_dir / "keys"))
