"""An empty pull fetch times out with `nats.errors.TimeoutError`, the type nats-py documents and
FastStream's pull loop expects — never a bare `asyncio.TimeoutError`.

nats-py 2.16 raises the bare one when its deadline is spent after the no-wait probe; FastStream's
loop then died, and its supervisor logged an ERROR with a traceback at every service start
(shared.broker.restore_fetch_timeout_contract)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import nats.errors
import pytest
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext


@dataclass
class Pull:
    js: JetStreamContext
    subject: str
    sub: JetStreamContext.PullSubscription


@pytest.fixture
async def pull(nats_url: str) -> AsyncIterator[Pull]:
    """A pull consumer on a stream of its own (deleted after)."""
    nc = await nats.connect(nats_url)
    name = f"FETCH_{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
        yield Pull(js, f"{name.lower()}.x", await js.pull_subscribe(f"{name.lower()}.x", durable="d"))
    finally:
        await nc.jetstream().delete_stream(name)
        await nc.close()


async def test_an_empty_fetch_whose_deadline_ran_out_raises_the_documented_timeout(
    pull: Pull, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = pull.sub
    # The branch nats-py takes when the server's "request timeout" answer to the probe came just
    # before the client's own timer: its deadline is spent before the lingering request. Made
    # deterministic: the client waits a little longer for that answer, then finds no time left.
    wait_for_answer = Subscription.next_msg

    async def next_msg(self: Subscription, timeout: float | None = 1.0) -> object:
        return await wait_for_answer(self, timeout=None if timeout is None else timeout + 2.0)

    monkeypatch.setattr(Subscription, "next_msg", next_msg)
    monkeypatch.setattr(JetStreamContext, "_time_until", classmethod(lambda cls, timeout, start: -0.001))
    with pytest.raises(nats.errors.TimeoutError):
        await asyncio.wait_for(sub.fetch(batch=4, timeout=0.5), 10)
    monkeypatch.undo()
    # an ordinary empty fetch, and a fetch that finds a message, are untouched
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(batch=4, timeout=0.2)
    await pull.js.publish(pull.subject, b"hello")
    (msg,) = await sub.fetch(batch=4, timeout=2)
    assert msg.data == b"hello"


async def test_the_fix_keeps_fetch_cancellable(pull: Pull) -> None:
    task = asyncio.create_task(pull.sub.fetch(batch=4, timeout=10))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
