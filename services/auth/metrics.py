"""Prometheus metrics of one auth app (own registry: several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

EXCHANGE_OUTCOMES = (
    "connected",
    "invalid_code_format",
    "invalid_state",
    "forbidden_state",
    "invalid_code",
    "upstream_rate_limited",
    "upstream_error",
    "upstream_timeout",
    "upstream_bad_response",
    "vault_key_unavailable",
    "store_unavailable",
    "bus_unavailable",
    "internal",
)


class AuthMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.logins_started = Counter(
            "ccbridge_auth_logins_started", "Logins started (authorize URLs handed out).", registry=self.registry
        )
        self.exchanges = Counter(
            "ccbridge_auth_exchanges", "Code exchanges by outcome.", ["outcome"], registry=self.registry
        )
        for outcome in EXCHANGE_OUTCOMES:
            self.exchanges.labels(outcome=outcome)

    def exchange(self, outcome: str) -> None:
        outcome = outcome.replace("-", "_")
        self.exchanges.labels(outcome=outcome if outcome in EXCHANGE_OUTCOMES else "internal").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
