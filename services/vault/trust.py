"""Who may ask the vault for credentials: a fixed set of X25519 public keys.

Anybody on the bus can send a `vault.credentials.get` request, but the reply is sealed to
the public key in the request, so the trust decision is: "is this key one of ours?". The set
comes from VAULT_TRUSTED_REQUESTER_KEYS plus every `<keys_dir>/sandbox*.hpke.pub` present when
the vault starts (loaded once, not per request).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.vault.errors import InvalidKeyring, InvalidRequest, UnauthorizedRequester
from shared.sealing import Recipient, SealingError, public_key_bytes

log = logging.getLogger(__name__)

TRUSTED_KEY_GLOB = "sandbox*.hpke.pub"


@dataclass(frozen=True)
class TrustedRequesters:
    keys: frozenset[bytes]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, recipients: Iterable[Recipient]) -> TrustedRequesters:
        return cls(frozenset(public_key_bytes(r.public_key) for r in recipients))

    @classmethod
    def load(cls, env_value: str | None, keys_dir: Path) -> TrustedRequesters:
        """Comma-separated base64url keys from the env (a bad one is a configuration error),
        plus the sandbox public key files in `keys_dir` (a bad file is logged and skipped)."""
        recipients: list[Recipient] = []
        for i, item in enumerate(p.strip() for p in (env_value or "").split(",")):
            if not item:
                continue
            try:
                recipients.append(Recipient.from_b64(item))
            except SealingError:
                raise InvalidKeyring(
                    f"VAULT_TRUSTED_REQUESTER_KEYS entry #{i + 1} is not an X25519 public key"
                ) from None
        if Path(keys_dir).is_dir():
            for path in sorted(Path(keys_dir).glob(TRUSTED_KEY_GLOB)):
                try:
                    recipients.append(Recipient.from_b64(path.read_text()))
                except (OSError, SealingError):
                    log.warning("skipping unreadable trusted key file %s", path.name)
        return cls.of(recipients)

    def recipient(self, public_key_b64: str, key_id: str) -> Recipient:
        """The requester to seal the reply to, if it is trusted."""
        try:
            recipient = Recipient.from_b64(public_key_b64)
        except SealingError:
            raise InvalidRequest("requester_public_key is not an X25519 public key") from None
        if public_key_bytes(recipient.public_key) not in self.keys:
            raise UnauthorizedRequester("requester key is not trusted")
        if recipient.key_id != key_id:
            raise InvalidRequest("requester_key_id does not match requester_public_key")
        return recipient


__all__ = ["TRUSTED_KEY_GLOB", "TrustedRequesters"]
