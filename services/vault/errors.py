"""The vault's one error tree.

Every error carries a machine `reason` (what goes on the wire: a `CredentialsReply.error`, a
dead-letter reason) and whether retrying can help (`retryable`). On the bus the same tree
decides what happens to a message: retryable → nack with a delay, anything else → dead letter.
Messages never include token material, key bytes or ciphertext.
"""

from __future__ import annotations


class VaultError(Exception):
    reason: str = "internal"
    retryable: bool = False

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


# --- requests ----------------------------------------------------------------
class NotConnected(VaultError):
    reason = "not_connected"


class ReconnectRequired(VaultError):
    reason = "reconnect_required"


class UnauthorizedRequester(VaultError):
    reason = "unauthorized_requester"


class InvalidRequest(VaultError):
    reason = "invalid_request"


# --- events ------------------------------------------------------------------
class InvalidEvent(VaultError):
    """A message that can never be processed (poison): dead-lettered, never retried."""

    reason = "invalid_event"


class UnopenableBox(InvalidEvent):
    reason = "unopenable_box"


# --- storage -----------------------------------------------------------------
class StoreUnavailable(VaultError):
    """The database did not answer (down, locked, timed out): try again later."""

    reason = "store_unavailable"
    retryable = True


class ConcurrencyConflict(VaultError):
    """Somebody else changed the same connection first: reload and try again."""

    reason = "concurrency_conflict"
    retryable = True


# --- keyring -----------------------------------------------------------------
class KeyringError(VaultError):
    reason = "keyring_error"


class InvalidKeyring(KeyringError):
    """VAULT_KEKS / the KEK file is malformed."""

    reason = "invalid_keyring"


class UnknownKeyId(KeyringError):
    reason = "unknown_key_id"

    def __init__(self, kek_id: str) -> None:
        super().__init__(f"no key-encryption key with id {kek_id!r}")
        self.kek_id = kek_id


class DecryptionFailed(KeyringError):
    """Tampered data, or decrypted in the wrong context (user, version, key id)."""

    reason = "decryption_failed"
