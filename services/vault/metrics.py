"""Prometheus metrics of one vault (own registry: several vaults may live in one process, e.g.
in tests). Labels are closed sets — never a user id, never anything secret."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.delivery import BreakerMetrics

REQUEST_OUTCOMES = (
    "ok",
    "not_connected",
    "reconnect_required",
    "unauthorized_requester",
    "invalid_request",
    "unavailable",
    "internal",
    "grant_required",
    "grant_invalid",
)
REFRESH_OUTCOMES = (
    "ok",
    "invalid_grant",
    "rate_limited",
    "upstream_error",
    "timeout",
    "bad_response",
    "rejected",
    "decrypt_failed",
    "conflict",
    "store_unavailable",
    "lost_lease",
)
ISSUED_OUTCOMES = ("stored", "replaced_undecryptable", "duplicate", "stale", "revoked", "dead_lettered", "retried")
STORE_OPERATIONS = (
    "release",
    "lease",
    "status",
    "store_issued",
    "revoke",
    "refresh_scan",
    "refresh_claim",
    "refresh_load",
    "refresh_save",
    "maintenance",
    "audit",
)
STATES = ("connected", "refresh_failed", "reconnect_required")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _closed(value: str, allowed: tuple[str, ...], fallback: str) -> str:
    return value if value in allowed else fallback


class VaultMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.credential_requests = Counter(
            "ccbridge_vault_credential_requests", "vault.credentials.get requests by outcome.", ["outcome"], registry=r
        )
        self.credential_latency = Histogram(
            "ccbridge_vault_credential_request_seconds", "Time to answer vault.credentials.get.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.refreshes = Counter(
            "ccbridge_vault_refreshes", "Token refresh attempts by outcome.", ["outcome"], registry=r
        )
        self.tokens_issued = Counter(
            "ccbridge_vault_tokens_issued", "tokens.issued messages by outcome.", ["outcome"], registry=r
        )
        self.revocations = Counter(
            "ccbridge_vault_revocations", "tokens.revoked handled, by outcome.", ["outcome"], registry=r
        )
        self.store_latency = Histogram(
            "ccbridge_vault_store_seconds", "Database time per operation.", ["operation"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decrypt_failures = Counter(
            "ccbridge_vault_decrypt_failures", "Records that did not decrypt, by reason.", ["reason"], registry=r
        )
        self.keyring_reloads = Counter(
            "ccbridge_vault_keyring_reloads", "Times the KEK source was reloaded with a changed key set.", registry=r
        )
        self.trust_reloads = Counter(
            "ccbridge_vault_trust_reloads", "Times the trusted requester keys changed on reload.", registry=r
        )
        self.events_published = Counter(
            "ccbridge_vault_events_published", "Events the vault published, by subject and outcome.",
            ["subject", "outcome"], registry=r,
        )
        self.leases_ended = Counter(
            "ccbridge_vault_leases_ended", "Sandbox leases ended, by reason.", ["reason"], registry=r
        )
        self.provider_revocations = Counter(
            "ccbridge_vault_provider_revocations", "Logins revoked at the OAuth server on disconnect, by outcome.",
            ["outcome"], registry=r,
        )
        self.connections = Gauge(
            "ccbridge_vault_connections", "Connections by state (last maintenance scan).", ["state"], registry=r
        )
        self.breakers = BreakerMetrics(r, "vault", ("database",))
        for outcome in REQUEST_OUTCOMES:
            self.credential_requests.labels(outcome=outcome)
        for outcome in REFRESH_OUTCOMES:
            self.refreshes.labels(outcome=outcome)
        for outcome in ISSUED_OUTCOMES:
            self.tokens_issued.labels(outcome=outcome)
        for state in STATES:
            self.connections.labels(state=state)

    # --- recording -------------------------------------------------------------------
    def credential_request(self, outcome: str, seconds: float | None = None) -> None:
        self.credential_requests.labels(outcome=_closed(outcome, REQUEST_OUTCOMES, "internal")).inc()
        if seconds is not None:
            self.credential_latency.observe(seconds)

    def refresh(self, outcome: str) -> None:
        self.refreshes.labels(outcome=_closed(outcome, REFRESH_OUTCOMES, "upstream_error")).inc()

    def issued(self, outcome: str) -> None:
        self.tokens_issued.labels(outcome=_closed(outcome, ISSUED_OUTCOMES, "retried")).inc()

    def revocation(self, outcome: str) -> None:
        self.revocations.labels(outcome=_closed(outcome, ("revoked", "not_connected", "duplicate"), "other")).inc()

    def lease_ended(self, reason: str) -> None:
        self.leases_ended.labels(reason=_closed(reason, ("lease_expired", "grant_ended"), "grant_ended")).inc()

    def provider_revocation(self, outcome: str) -> None:
        allowed = ("revoked", "already_invalid", "failed", "no_refresh_token")
        self.provider_revocations.labels(outcome=_closed(outcome, allowed, "failed")).inc()

    def decrypt_failure(self, reason: str) -> None:
        allowed = ("decryption_failed", "unknown_key_id", "retired_key_id", "keyring_error")
        self.decrypt_failures.labels(reason=_closed(reason, allowed, "keyring_error")).inc()

    def published(self, subject: str, ok: bool) -> None:
        self.events_published.labels(subject=subject, outcome="ok" if ok else "failed").inc()

    def set_connections(self, counts: Mapping[str, int]) -> None:
        for state in STATES:
            self.connections.labels(state=state).set(counts.get(state, 0))

    @contextmanager
    def store_timer(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.store_latency.labels(operation=_closed(operation, STORE_OPERATIONS, "maintenance")).observe(
                time.perf_counter() - started
            )

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (tests, /healthz details)."""
        found = self.registry.get_sample_value(name, labels)
        return float(found or 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
