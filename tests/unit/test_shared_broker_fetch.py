"""A pull fetch that times out raises `nats.errors.TimeoutError` — the one FastStream's pull loop
expects — also where nats-py 2.16 raises a bare `asyncio.TimeoutError` (an idle consumer whose
no-wait probe used up the timeout). Otherwise the loop ends, FastStream's supervisor restarts
it and keeps the ended task in `subscriber.tasks` for good (docs/performance.md, "Memory")."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest
from nats.js import JetStreamContext

from shared.broker import restore_fetch_timeout_contract


def pull_subscription(fetch_n: Any) -> JetStreamContext.PullSubscription:
    sub = JetStreamContext.PullSubscription.__new__(JetStreamContext.PullSubscription)
    sub._sub = object()  # "subscribed"
    sub._fetch_n = fetch_n
    return sub


@pytest.mark.parametrize("raised", [asyncio.TimeoutError, nats.errors.TimeoutError])
async def test_a_fetch_timeout_is_a_nats_timeout(raised: type[BaseException]) -> None:
    restore_fetch_timeout_contract()
    restore_fetch_timeout_contract()  # idempotent: one wrapper

    async def times_out(*_args: Any) -> list[Any]:
        raise raised

    with pytest.raises(nats.errors.TimeoutError):
        await pull_subscription(times_out).fetch(batch=8, timeout=1.0)
    assert not hasattr(JetStreamContext.PullSubscription.fetch.__wrapped__, "__wrapped__")


async def test_what_a_fetch_returns_and_other_errors_pass_through() -> None:
    restore_fetch_timeout_contract()

    async def two(*_args: Any) -> list[str]:
        return ["a", "b"]

    async def closed(*_args: Any) -> list[Any]:
        raise nats.errors.ConnectionClosedError

    assert await pull_subscription(two).fetch(batch=8, timeout=1.0) == ["a", "b"]
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pull_subscription(closed).fetch(batch=8, timeout=1.0)
