"""The ccbridge streams on a real nats-server: a size cap (CCBRIDGE_STREAM_MAX_BYTES), so a
publisher that floods the bus cannot fill the disk; when full the oldest messages go."""

from __future__ import annotations

import nats
from nats.js.api import DiscardPolicy

from ccbridge.embedded_nats import EmbeddedNats
from shared import subjects
from shared.broker import ensure_streams
from shared.settings import ServiceSettings


async def test_streams_are_capped_and_a_flood_drops_the_oldest(embedded_nats: EmbeddedNats) -> None:
    cap = 1 << 20
    nc = await nats.connect(embedded_nats.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, max_bytes=cap)
        for spec in subjects.ALL_STREAMS:
            config = (await js.stream_info(spec.name)).config
            assert (config.max_bytes, config.discard) == (cap, DiscardPolicy.OLD), spec.name
        body = b"x" * 4096
        for _ in range(600):  # ~2.4 MB into a 1 MiB stream
            await js.publish(subjects.SANDBOX_CREATED, body, stream=subjects.SANDBOX_STREAM.name)
        state = (await js.stream_info(subjects.SANDBOX_STREAM.name)).state
        assert state.bytes <= cap and state.last_seq == 600 and state.first_seq > 1
        await ensure_streams(js, max_bytes=2 * cap)  # a changed setting updates the live streams
        assert (await js.stream_info(subjects.SANDBOX_STREAM.name)).config.max_bytes == 2 * cap
    finally:
        await nc.close()


def test_the_cap_is_a_setting_with_a_safe_default(monkeypatch) -> None:
    monkeypatch.delenv("CCBRIDGE_STREAM_MAX_BYTES", raising=False)
    assert ServiceSettings().stream_max_bytes == 1 << 30
    monkeypatch.setenv("CCBRIDGE_STREAM_MAX_BYTES", "5242880")
    assert ServiceSettings().stream_max_bytes == 5 << 20
