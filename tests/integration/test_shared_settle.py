"""`shared.broker.settle`: once it returns, the server routes to a subscription just made.

A plain `flush()` missed ~6 % of such messages with nats-py 2.16 (its PING overtakes the queued
SUB); this runs the same race enough times to catch that rate."""

from __future__ import annotations

import asyncio
import uuid

import nats

from shared.broker import settle


async def test_a_subscription_is_live_at_the_server_once_settled(nats_url: str) -> None:
    subscriber, publisher = await nats.connect(nats_url), await nats.connect(nats_url)
    missed = []
    try:
        for attempt in range(300):
            subject = f"ccbridge-test.settle.{uuid.uuid4().hex}"
            received = asyncio.Event()

            async def on_message(_msg: nats.aio.msg.Msg, received: asyncio.Event = received) -> None:
                received.set()

            sub = await subscriber.subscribe(subject, cb=on_message)
            await settle(subscriber)
            await publisher.publish(subject, b"x")
            try:
                await asyncio.wait_for(received.wait(), 2)
            except TimeoutError:
                missed.append(attempt)
            await sub.unsubscribe()
    finally:
        await subscriber.close()
        await publisher.close()
    assert missed == []
