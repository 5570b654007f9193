"""Keys the auth service needs: the vault's public HPKE key (to seal tokens to) and the
secret that signs caller JWTs."""

from __future__ import annotations

import secrets
from pathlib import Path

from shared.files import write_private_file
from shared.logging import get_logger
from shared.sealing import Recipient, SealingError, key_paths

log = get_logger(__name__)

JWT_SECRET_FILE = "auth-jwt.secret"


class VaultKeySource:
    """`VAULT_PUBLIC_KEY` if set (checked at once), else `<keys_dir>/vault.hpke.pub`, read when
    first needed (the vault may start after auth) and re-read when the file changes (rotation)."""

    def __init__(self, *, env_value: str | None, keys_dir: Path) -> None:
        self._fixed = Recipient.from_b64(env_value) if env_value else None  # SealingError if malformed
        self._path = key_paths(keys_dir, "vault")[1]
        self._cached: tuple[tuple[int, int], Recipient] | None = None

    def current(self) -> Recipient | None:
        if self._fixed is not None:
            return self._fixed
        try:
            st = self._path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if self._cached is not None and self._cached[0] == stamp:
            return self._cached[1]
        try:
            recipient = Recipient.from_b64(self._path.read_text())
        except (OSError, SealingError, UnicodeDecodeError):
            log.warning("vault public key file is unreadable or malformed", path=str(self._path))
            return None
        if self._cached is None or self._cached[1].key_id != recipient.key_id:
            log.info("vault public key loaded", key_id=recipient.key_id, path=str(self._path))
        self._cached = (stamp, recipient)
        return recipient


def load_or_create_jwt_secret(keys_dir: Path) -> str:
    """The dev secret in `<keys_dir>/auth-jwt.secret` (0600), created on first use; first writer
    wins if several processes race. Production sets AUTH_JWT_SECRET instead."""
    path = keys_dir / JWT_SECRET_FILE
    if not path.exists():
        write_private_file(path, secrets.token_urlsafe(48) + "\n")
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise RuntimeError(f"{path} holds a secret shorter than 32 characters: delete it or set AUTH_JWT_SECRET")
    return secret
