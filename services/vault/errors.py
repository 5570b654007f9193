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


class GrantRequired(VaultError):
    """CCBRIDGE_GRANTS=required and the request carries no grant."""

    reason = "grant_required"


class GrantInvalid(VaultError):
    """The grant is forged, expired, for another person / sandbox / weaker mode, or its lease
    ended. `detail` says which (no secret in it)."""

    reason = "grant_invalid"


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
    dependency = "database"  # shared.delivery: its breaker pauses the work that needs it


class RequestTimeout(VaultError):
    """A request did not finish within its latency budget (VAULT_REQUEST_TIMEOUT_S)."""

    reason = "request_timeout"
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


class RetiredKeyId(KeyringError):
    """The record is wrapped by a KEK that an operator retired (its bytes are gone).
    Never silent: the caller logs it, audits it and answers with an error."""

    reason = "retired_key_id"

    def __init__(self, kek_id: str, retired_at: str = "") -> None:
        when = f" on {retired_at}" if retired_at else ""
        super().__init__(f"key-encryption key {kek_id!r} was retired{when}; rewrap before retiring")
        self.kek_id = kek_id
        self.retired_at = retired_at


class DecryptionFailed(KeyringError):
    """Tampered data, or decrypted in the wrong context (user, version, key id)."""

    reason = "decryption_failed"


class KeySourceReadOnly(KeyringError):
    """Rotation needs a writable KEK source (the key file); VAULT_KEKS comes from the environment."""

    reason = "key_source_read_only"


# --- refresh (the OAuth token endpoint) ------------------------------------------
class RefreshError(VaultError):
    """A refresh attempt failed; `outcome` is the metrics/audit label."""

    reason = "refresh_failed"
    outcome = "upstream_error"


class RefreshRejected(RefreshError):
    """`invalid_grant`: the refresh token is dead (rotated elsewhere, login expired, revoked).
    Only a new login helps."""

    reason = "invalid_grant"
    outcome = "invalid_grant"


class RefreshTransient(RefreshError):
    """429, 5xx, timeouts, connection errors, unexpected answers: back off and try again."""

    retryable = True

    def __init__(self, detail: str, *, outcome: str = "upstream_error", retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.retry_after_s = retry_after_s
