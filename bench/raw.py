"""The raw limit: a nats-py JetStream loop with no ccbridge code at all.

A durable pull consumer fetches `batch` messages at a time and keeps at most `in_flight` of
them in hand (a fetched batch waits for free slots before the next fetch, as FastStream's
concurrent pull subscriber does in the sandbox service); each message is republished to the
output subject with a Nats-Msg-Id — asynchronously (`publish_async`: no request per publish,
the PubAcks of everything in flight outstanding together) — and acked once its own PubAck is
in. That is the shape of ccbridge's `sandbox.created` consumer (same fetch batch, same
in-flight limit, same message — a real `sandbox.created` with its grant —, same file-store
stream settings) minus everything ccbridge does in between. Publish-then-ack (not
ack-then-publish) keeps it at-least-once, like the pipeline, at the same cost.

Run as its own process, like a service: `python -m bench.raw --url ... --count N`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import nats
from nats.aio.msg import Msg
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
            max_deliver=-1,
        ),
    )


async def run_loop(url: str, count: int, batch: int, in_flight: int | None = None) -> float:
    nc = await nats.connect(url, name="bench-raw")
    js = nc.jetstream()
    psub = await js.pull_subscribe(SUBJECT_IN, durable=DURABLE, stream=STREAM)
    slots = asyncio.Semaphore(in_flight or batch)
    handling: set[asyncio.Task[None]] = set()
    done = 0

    async def handle(msg: Msg) -> None:
        nonlocal done
        try:
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            pub_ack = await js.publish_async(SUBJECT_OUT, msg.data, headers={"Nats-Msg-Id": f"out-{msg_id}"},
                                             stream=STREAM)
            await pub_ack  # stored: only then is the input acked
            await msg.ack()
            done += 1
        finally:
            slots.release()

    started = time.perf_counter()
    while done < count:
        try:
            messages = await psub.fetch(batch=batch, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in messages:  # each waits for a free slot; the next fetch after the last has one
            await slots.acquire()
            task = asyncio.create_task(handle(msg))
            handling.add(task)
            task.add_done_callback(handling.discard)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*handling)
    await nc.flush()  # the last acks are out
    await nc.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8, help="messages per fetch (SANDBOX_CONCURRENCY)")
    parser.add_argument("--in-flight", type=int, default=None, help="messages in hand at most (default: batch)")
    args = parser.parse_args()
    elapsed = asyncio.run(run_loop(args.url, args.count, args.batch, args.in_flight))
    print(f"{args.count / elapsed:.1f}")


if __name__ == "__main__":
    main()
