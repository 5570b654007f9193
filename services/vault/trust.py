"""Who may ask the vault for credentials: a set of X25519 public keys.

Anybody on the bus can send a `vault.credentials.get` request, but the reply is sealed to
the public key in the request, so the trust decision is: "is this key one of ours?". The set
comes from VAULT_TRUSTED_REQUESTER_KEYS plus every `<keys_dir>/sandbox*.hpke.pub`.

`TrustedRequesters` is one immutable snapshot. `TrustStore` is what the vault uses: it loads a
snapshot at start and re-reads the env value and the key files when a request comes with a key
it does not know (a sandbox replica that started after the vault), at most once per
`min_interval_s` so unknown keys cannot make the vault hammer the disk; `reload()` is also
called periodically, which is how a removed key file stops being trusted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from services.vault.errors import InvalidKeyring, InvalidRequest, UnauthorizedRequester
from shared.grants import UNTRUSTED_KEY, GrantClaims, GrantError, GrantVerifier, trusted_public_keys
from shared.sealing import Recipient, SealingError, public_key_bytes

log = logging.getLogger(__name__)

TRUSTED_KEY_GLOB = "sandbox*.hpke.pub"


MAX_PARSED_KEYS = 256


@dataclass(frozen=True)
class TrustedRequesters:
    keys: frozenset[bytes]
    _parsed: dict[str, Recipient] = field(default_factory=dict, compare=False, repr=False)

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
        """The requester to seal the reply to, if it is trusted. Trusted keys are parsed once
        per snapshot (a handful of sandbox replicas), not on every request."""
        recipient = self._parsed.get(public_key_b64)
        if recipient is None:
            try:
                recipient = Recipient.from_b64(public_key_b64)
            except SealingError:
                raise InvalidRequest("requester_public_key is not an X25519 public key") from None
            if public_key_bytes(recipient.public_key) not in self.keys:
                raise UnauthorizedRequester("requester key is not trusted")
            if len(self._parsed) < MAX_PARSED_KEYS:
                self._parsed[public_key_b64] = recipient
        if recipient.key_id != key_id:
            raise InvalidRequest("requester_key_id does not match requester_public_key")
        return recipient


class TrustStore:
    """A `TrustedRequesters` snapshot that reloads itself on an unknown key (rate-limited)."""

    def __init__(
        self,
        env_value: str | None,
        keys_dir: Path,
        *,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        initial: TrustedRequesters | None = None,
    ) -> None:
        self._env_value = env_value
        self._keys_dir = Path(keys_dir)
        self._min_interval = min_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._current = initial if initial is not None else TrustedRequesters.load(env_value, keys_dir)
        self._loaded_at = clock()
        self.reloads = 0

    @classmethod
    def fixed(cls, trusted: TrustedRequesters) -> TrustStore:
        """A store that never finds new keys (tests, or a vault without a keys dir)."""
        store = cls(None, Path("/nonexistent-ccbridge-keys"), initial=trusted, min_interval_s=float("inf"))
        store._fixed = True
        return store

    _fixed = False

    def __len__(self) -> int:
        return len(self._current)

    @property
    def current(self) -> TrustedRequesters:
        return self._current

    def reload(self, *, force: bool = True) -> bool:
        """Re-read env + key files; True if the set changed. A bad env value keeps the old set."""
        if self._fixed:
            return False
        now = self._clock()
        with self._lock:
            if not force and now - self._loaded_at < self._min_interval:
                return False
            self._loaded_at = now
            try:
                fresh = TrustedRequesters.load(self._env_value, self._keys_dir)
            except InvalidKeyring:
                log.warning("trusted requester keys not reloaded: VAULT_TRUSTED_REQUESTER_KEYS is invalid")
                return False
            changed = fresh.keys != self._current.keys
            self._current = fresh
            if changed:
                self.reloads += 1
                log.info("trusted requester keys reloaded: %d keys", len(fresh))
            return changed

    def recipient(self, public_key_b64: str, key_id: str) -> Recipient:
        try:
            return self._current.recipient(public_key_b64, key_id)
        except UnauthorizedRequester:
            if not self.reload(force=False):
                raise
            return self._current.recipient(public_key_b64, key_id)




class GrantKeys:
    """Auth's grant keys as the vault trusts them (VAULT_GRANT_PUBLIC_KEYS + `auth.grant.pub`),
    re-read when a grant names a key id it does not know — auth may have started after the
    vault, or rotated — at most once per `min_interval_s`."""

    def __init__(self, env_value: str | None, keys_dir: Path | None, *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._env_value = env_value
        self._keys_dir = keys_dir
        self._min_interval = min_interval_s
        self._clock = clock
        self._verifier = self._load()
        self._loaded_at = float("-inf")  # the first unknown key may look again at once

    def _load(self) -> GrantVerifier:
        try:
            return GrantVerifier(trusted_public_keys(self._env_value, self._keys_dir))
        except GrantError as exc:
            raise InvalidKeyring(f"VAULT_GRANT_PUBLIC_KEYS: {exc.detail}") from None

    def __len__(self) -> int:
        return len(self._verifier)

    def __repr__(self) -> str:
        return f"GrantKeys({self._verifier!r})"

    def _reload(self) -> bool:
        now = self._clock()
        if now - self._loaded_at < self._min_interval:
            return False
        self._loaded_at = now
        try:
            fresh = self._load()
        except (InvalidKeyring, OSError):
            log.warning("grant keys not reloaded: VAULT_GRANT_PUBLIC_KEYS or auth.grant.pub is invalid")
            return False
        changed = repr(fresh) != repr(self._verifier)
        self._verifier = fresh
        if changed:
            log.info("grant keys reloaded: %d keys", len(fresh))
        return changed

    def _retrying(self, call: Callable[[GrantVerifier], GrantClaims]) -> GrantClaims:
        try:
            return call(self._verifier)
        except GrantError as exc:
            if exc.detail != UNTRUSTED_KEY or not self._reload():
                raise
            return call(self._verifier)

    def verify(self, token: str, *, now_s: float, allow_expired: bool = False) -> GrantClaims:
        return self._retrying(lambda v: v.verify(token, now_s=now_s, allow_expired=allow_expired))

    def check(self, token: str, *, user_id: str, sandbox_id: str | None, mode: str, now_s: float) -> GrantClaims:
        return self._retrying(lambda v: v.check(token, user_id=user_id, sandbox_id=sandbox_id, mode=mode, now_s=now_s))


__all__ = ["TRUSTED_KEY_GLOB", "GrantKeys", "TrustStore", "TrustedRequesters"]
