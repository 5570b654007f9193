"""One error tree for the sandbox service.

Every error carries a machine-readable `reason` (a `shared.events.FailureReason`, the value
that goes into `sandbox.credentials.failed`) and `retryable`, which decides on the bus whether
the `sandbox.created` message is nacked for redelivery or answered with a final failure.
`detail` is for humans; it never holds token material.
"""

from __future__ import annotations

from shared.events import FailureReason


class SandboxError(Exception):
    reason: FailureReason = "backend_error"
    retryable: bool = False
    dependency: str | None = None
    """The dependency this error says is down (`shared.delivery`: its breaker pauses the work)."""

    def __init__(self, detail: str = "", *, retryable: bool | None = None, dependency: str | None = None) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail[:500]
        if retryable is not None:
            self.retryable = retryable
        if dependency is not None:
            self.dependency = dependency

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, retryable={self.retryable}, detail={self.detail!r})"


# --- vault ---------------------------------------------------------------------
class VaultUnavailable(SandboxError):
    """No answer from the vault in time (or no vault listening, or its database is down): the
    work that needs it pauses until it is back."""

    reason: FailureReason = "vault_unavailable"
    retryable = True
    dependency = "vault"


class NotConnected(SandboxError):
    """The person has not connected a Claude account: retrying will not help."""

    reason: FailureReason = "not_connected"


class ReconnectRequired(SandboxError):
    """The stored login is dead (e.g. `invalid_grant`): the person must connect again."""

    reason: FailureReason = "reconnect_required"


class GrantRequired(SandboxError):
    """The sandbox.created carries no grant (and the vault requires one): nothing is written."""

    reason: FailureReason = "grant_required"


class GrantInvalid(SandboxError):
    """The vault refused the grant (forged, expired, another person/sandbox, mode not within
    it, lease ended): nothing is written."""

    reason: FailureReason = "grant_invalid"


class VaultError(SandboxError):
    """The vault answered, but not with usable credentials (refused us, internal error,
    a reply we cannot parse or open)."""

    reason: FailureReason = "vault_error"


# --- backends --------------------------------------------------------------------
class BackendError(SandboxError):
    """Writing into the sandbox failed; I/O trouble is usually transient."""

    reason: FailureReason = "backend_error"
    retryable = True


class PathOutsideSandbox(BackendError):
    """A path resolved outside the sandbox (`..`, absolute path, symlink): refused, final."""

    retryable = False


class BackendUnavailable(SandboxError):
    """The backend named by the event is not configured, or cannot be reached."""

    reason: FailureReason = "backend_unavailable"


class SandboxNotFound(SandboxError):
    reason: FailureReason = "sandbox_not_found"


# --- input -------------------------------------------------------------------------
class InvalidEvent(SandboxError):
    """The event is well-formed JSON but asks for something we cannot do (e.g. a bad
    config_dir)."""

    reason: FailureReason = "invalid_event"


class SandboxGone(SandboxNotFound):
    """`sandbox.destroyed` was already received for this sandbox: nothing to inject into."""


# --- live-sandbox registry (JetStream KV) ------------------------------------------------
class LiveRegistryError(SandboxError):
    """The live-sandbox bucket could not be read or written (bus trouble): try again later."""

    reason: FailureReason = "backend_unavailable"
    retryable = True


class LiveRecordChanged(LiveRegistryError):
    """Another handler (a refresh, a revoke, a duplicate on another replica) changed this
    sandbox's record while we worked: redo the work against the new record."""
