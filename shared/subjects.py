"""Subject names, JetStream streams and durable consumer names, declared once.

Public names (see design.md) must not change; everything else here is ccbridge's own.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- public subjects -------------------------------------------------------
TOKENS_ISSUED = "tokens.issued"
TOKENS_REFRESHED = "tokens.refreshed"
TOKENS_REVOKED = "tokens.revoked"
TOKENS_RECONNECT_REQUIRED = "tokens.reconnect_required"
TOKENS_LOGIN_EXPIRING = "tokens.login_expiring"  # vault: a login lapses soon (ccbridge's own)
SANDBOX_CREATED = "sandbox.created"
SANDBOX_DESTROYED = "sandbox.destroyed"
SANDBOX_CREDENTIALS_INJECTED = "sandbox.credentials.injected"
SANDBOX_CREDENTIALS_FAILED = "sandbox.credentials.failed"
SANDBOX_CREDENTIALS_SCRUBBED = "sandbox.credentials.scrubbed"  # sandbox → platform, after tokens.revoked
VAULT_CREDENTIALS_GET = "vault.credentials.get"  # core NATS request/reply, not a stream
VAULT_CONNECTIONS_STATUS = "vault.connections.status"  # core NATS request/reply (auth asks, vault answers)

# --- grants: a person's lease of their credentials to one sandbox (ccbridge's own) --------
GRANTS_ISSUED = "grants.issued"  # auth → vault: a grant was signed (how a newer lease reaches a live sandbox)
GRANTS_REVOKED = "grants.revoked"  # auth → vault: the person ended a lease (DELETE .../grants/{sandbox_id})
GRANTS_ENDED = "grants.ended"  # vault → sandbox service, platform: a lease is over (expired or ended)
VAULT_GRANTS_LIST = "vault.grants.list"  # core NATS request/reply (auth asks, vault answers)

# --- reply inboxes (ccbridge's own) ------------------------------------------
# Every connection gets its own inbox prefix, so that NATS permissions can let each user
# subscribe to its own replies only (`_INBOX.ccbridge-vault.>`), never to another's: replies
# carry JetStream messages fetched from a durable, stream acks and request/reply answers.
INBOX_ROOT = "_INBOX"


def inbox_prefix(user: str) -> str:
    """`_INBOX.ccbridge-<user>`: nats-py appends `.<nuid>` (and request() `.<nuid>.<token>`)."""
    return f"{INBOX_ROOT}.ccbridge-{user}"


# --- dead letters (ccbridge's own) -----------------------------------------
DLQ_PREFIX = "dlq"


def dead_letter_subject(subject: str) -> str:
    """`dlq.<original subject>` so one stream holds every service's dead letters."""
    return f"{DLQ_PREFIX}.{subject}"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    # JetStream drops a second publish with the same Nats-Msg-Id inside this window.
    duplicate_window_s: float = 120.0
    max_age_s: float = 7 * 24 * 3600.0
    # Size cap (CCBRIDGE_STREAM_MAX_BYTES) against a publisher that floods the disk. When full the
    # oldest messages go ("old"): consumers ack in seconds, so those were handled long ago;
    # refusing new ones instead would stop all logins and sandboxes until max_age passed.
    discard: str = "old"


TOKENS_STREAM = StreamSpec("CCBRIDGE_TOKENS", ("tokens.>", "grants.>"))
SANDBOX_STREAM = StreamSpec("CCBRIDGE_SANDBOX", ("sandbox.>",))
DLQ_STREAM = StreamSpec("CCBRIDGE_DLQ", (f"{DLQ_PREFIX}.>",), max_age_s=30 * 24 * 3600.0)
ALL_STREAMS = (TOKENS_STREAM, SANDBOX_STREAM, DLQ_STREAM)

# --- durable consumers -----------------------------------------------------
VAULT_TOKENS_ISSUED_DURABLE = "vault-tokens-issued"
VAULT_TOKENS_REVOKED_DURABLE = "vault-tokens-revoked"
VAULT_GRANTS_ISSUED_DURABLE = "vault-grants-issued"
VAULT_GRANTS_REVOKED_DURABLE = "vault-grants-revoked"
SANDBOX_CREATED_DURABLE = "sandbox-created"
SANDBOX_DESTROYED_DURABLE = "sandbox-destroyed"
SANDBOX_TOKENS_REFRESHED_DURABLE = "sandbox-tokens-refreshed"
SANDBOX_TOKENS_REVOKED_DURABLE = "sandbox-tokens-revoked"
SANDBOX_GRANTS_ENDED_DURABLE = "sandbox-grants-ended"

# Queue groups: N replicas of one service share the work.
VAULT_QUEUE = "vault"
SANDBOX_QUEUE = "sandbox"

# --- KV buckets ------------------------------------------------------------
PENDING_LOGINS_BUCKET = "ccbridge_pending_logins"
LIVE_SANDBOXES_BUCKET = "ccbridge_live_sandboxes"  # sandbox service: which sandbox holds whose credentials

MSG_ID_HEADER = "Nats-Msg-Id"
