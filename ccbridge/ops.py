"""Operator tools that work on the bus itself: dead-letter inspection and replay.

A dead letter is the original message, unchanged, on `dlq.<subject>` with headers saying why
(`Ccbridge-Reason`) and where from (`Ccbridge-Original-Subject`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import nats
from nats.js.errors import NotFoundError

from shared import subjects
from shared.broker import ORIGINAL_SUBJECT_HEADER, REASON_HEADER
from shared.logging import redact_text

DLQ = subjects.DLQ_STREAM.name


@dataclass
class DeadLetter:
    seq: int
    subject: str
    original_subject: str
    reason: str
    time: datetime | None
    size: int
    body: bytes

    def as_dict(self, *, with_body: bool = False) -> dict:
        out = {
            "seq": self.seq,
            "original_subject": self.original_subject,
            "reason": self.reason,
            "time": self.time.isoformat() if self.time else None,
            "size": self.size,
        }
        if with_body:
            out["body"] = redact_text(self.body.decode("utf-8", errors="replace"))[:2000]
        return out


async def list_dead_letters(nc: nats.NATS, *, subject: str | None = None, limit: int = 100) -> list[DeadLetter]:
    js = nc.jetstream()
    try:
        info = await js.stream_info(DLQ)
    except NotFoundError:
        return []
    letters: list[DeadLetter] = []
    seq = info.state.first_seq
    while seq and seq <= info.state.last_seq and len(letters) < limit:
        try:
            raw = await js.get_msg(DLQ, seq)
        except NotFoundError:  # deleted after a replay
            seq += 1
            continue
        headers = raw.headers or {}
        original = headers.get(ORIGINAL_SUBJECT_HEADER, raw.subject.removeprefix(f"{subjects.DLQ_PREFIX}."))
        if subject is None or original == subject:
            letters.append(
                DeadLetter(
                    seq=seq,
                    subject=raw.subject,
                    original_subject=original,
                    reason=headers.get(REASON_HEADER, ""),
                    time=getattr(raw, "time", None),
                    size=len(raw.data or b""),
                    body=raw.data or b"",
                )
            )
        seq += 1
    return letters


async def replay_dead_letter(nc: nats.NATS, seq: int) -> str:
    """Publish the dead letter back on its original subject, then remove it from the DLQ.

    The replay gets a fresh Nats-Msg-Id so the stream's duplicate window does not drop it; the
    consumers are idempotent on the payload's own event_id, so a replay of something already
    processed has no second effect."""
    js = nc.jetstream()
    raw = await js.get_msg(DLQ, seq)
    headers = raw.headers or {}
    original = headers.get(ORIGINAL_SUBJECT_HEADER) or raw.subject.removeprefix(f"{subjects.DLQ_PREFIX}.")
    if original.startswith(f"{subjects.DLQ_PREFIX}."):
        raise ValueError("refusing to replay into the dead-letter stream itself")
    from shared.broker import stream_for

    await js.publish(
        original, raw.data or b"", headers={subjects.MSG_ID_HEADER: f"replay-{seq}"}, stream=stream_for(original)
    )
    await js.delete_msg(DLQ, seq)
    return original
