"""Prometheus metrics of one auth app (own registry: several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

EXCHANGE_OUTCOMES = (
    "connected",
    "invalid_code_format",
    "invalid_token_format",
    "invalid_state",
    "forbidden_state",
    "invalid_code",
    "rate_limited",
    "upstream_rate_limited",
    "upstream_error",
    "upstream_timeout",
    "upstream_bad_response",
    "vault_key_unavailable",
    "store_unavailable",
    "bus_unavailable",
    "internal",
)
# How a person connected: the `code#state` paste, the seed's `code#verifier`, a setup token.
CONNECT_PATHS = ("paste", "legacy", "setup_token")
GRANT_MODES = ("access_only", "env", "file")
REJECTIONS = ("rate_limited", "too_many_pending_logins", "payload_too_large", "unauthorized", "forbidden_token")


class AuthMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.logins_started = Counter(
            "ccbridge_auth_logins_started", "Logins started (authorize URLs handed out).", registry=self.registry
        )
        self.exchanges = Counter(
            "ccbridge_auth_exchanges", "Code exchanges (`code#state` pastes) by outcome.", ["outcome"],
            registry=self.registry,
        )
        self.connects = Counter(
            "ccbridge_auth_connects", "Connect attempts by path and outcome.", ["path", "outcome"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "ccbridge_auth_disconnects", "Disconnects requested (tokens.revoked published).", registry=self.registry
        )
        self.grants_issued = Counter(
            "ccbridge_auth_grants_issued", "Grants signed and handed to the vault (grants.issued), by mode.", ["mode"],
            registry=self.registry,
        )
        self.grants_ended = Counter(
            "ccbridge_auth_grants_ended", "Leases ended by their person (grants.revoked published).",
            registry=self.registry,
        )
        self.rejections = Counter(
            "ccbridge_auth_rejections", "Requests refused before any work: limits and caller authentication.",
            ["reason"], registry=self.registry,
        )
        for outcome in EXCHANGE_OUTCOMES:
            self.exchanges.labels(outcome=outcome)
        for path in CONNECT_PATHS:
            self.connects.labels(path=path, outcome="connected")
        for mode in GRANT_MODES:
            self.grants_issued.labels(mode=mode)
        for reason in REJECTIONS:
            self.rejections.labels(reason=reason)

    @staticmethod
    def _outcome(outcome: str) -> str:
        outcome = outcome.replace("-", "_")
        return outcome if outcome in EXCHANGE_OUTCOMES else "internal"

    def exchange(self, outcome: str) -> None:
        self.connect("paste", outcome)

    def connect(self, path: str, outcome: str) -> None:
        label = self._outcome(outcome)
        if path == "paste":
            self.exchanges.labels(outcome=label).inc()
        self.connects.labels(path=path, outcome=label).inc()

    def rejected(self, reason: str) -> None:
        reason = reason.replace("-", "_")
        if reason in REJECTIONS:
            self.rejections.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
