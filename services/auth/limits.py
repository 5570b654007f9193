"""Per-caller rate limits: a token bucket per (action, caller), in process memory. Each action
has its own bucket; `limits` gives an action its own rate and burst (others use the default).

Per replica: with N replicas behind a balancer a caller gets up to N times the rate. That is
the accepted trade-off (no shared state on the hot path); the pending-login cap, which is the
limit that protects the OAuth server and the store, is enforced across replicas in NATS KV.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    per_minute: float
    burst: int

    def __post_init__(self) -> None:
        if self.per_minute <= 0 or self.burst < 1:
            raise ValueError("rate and burst must be positive")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        *,
        per_minute: float,
        burst: int,
        limits: Mapping[str, Limit] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        default = Limit(per_minute, burst)
        self.rate = default.per_minute / 60.0
        self.burst = float(default.burst)
        self._limits = {action: (limit.per_minute / 60.0, float(limit.burst)) for action, limit in (limits or {}).items()}
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, action: str, caller: str) -> int | None:
        """Take one token: None if allowed, else the whole seconds to wait (>= 1)."""
        now = self._clock()
        rate, burst = self._limits.get(action, (self.rate, self.burst))
        key = (action, caller)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=burst, updated=now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max_keys:  # the least recently used go first
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / rate))
