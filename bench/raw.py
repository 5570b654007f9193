"""The raw limit: a nats-py JetStream loop with no ccbridge code at all.

A durable pull consumer fetches `batch` messages, handles them concurrently — publish the
payload to the output subject with a Nats-Msg-Id (waiting for JetStream's PubAck), then ack
the input — and fetches again. That is the shape of ccbridge's sandbox consumer (FastStream
pull subscriber, same batch size, same message size, same file-store stream settings) minus
everything ccbridge does in between. Publish-then-ack (not ack-then-publish) keeps it
at-least-once, like the pipeline, at the same cost.

Run as its own process, like a service: `python -m bench.raw --url ... --count N`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

STREAM = "BENCH_RAW"
SUBJECT_IN = "bench.raw.in"
SUBJECT_OUT = "bench.raw.out"
DURABLE = "bench-raw"


def stream_config() -> StreamConfig:
    """Same storage and duplicate window as ccbridge's own streams."""
    return StreamConfig(
        name=STREAM,
        subjects=["bench.raw.>"],
        storage=StorageType.FILE,
        duplicate_window=120.0,
        max_age=3600.0,
        num_replicas=1,
    )


async def ensure_stream(js: nats.js.JetStreamContext) -> None:
    try:
        await js.delete_stream(STREAM)
    except NotFoundError:
        pass
    await js.add_stream(stream_config())
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            filter_subject=SUBJECT_IN,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_deliver=5,
        ),
    )


async def run_loop(url: str, count: int, batch: int) -> float:
    nc = await nats.connect(url, name="bench-raw")
    js = nc.jetstream()
    psub = await js.pull_subscribe(SUBJECT_IN, durable=DURABLE, stream=STREAM)
    done = 0

    async def handle(msg: nats.aio.msg.Msg) -> None:
        nonlocal done
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        await js.publish(SUBJECT_OUT, msg.data, headers={"Nats-Msg-Id": f"out-{msg_id}"}, stream=STREAM, timeout=5)
        await msg.ack()
        done += 1

    started = time.perf_counter()
    while done < count:
        try:
            messages = await psub.fetch(batch=batch, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        await asyncio.gather(*(handle(m) for m in messages))
    elapsed = time.perf_counter() - started
    await nc.drain()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    elapsed = asyncio.run(run_loop(args.url, args.count, args.batch))
    print(f"{args.count / elapsed:.1f}")


if __name__ == "__main__":
    main()
