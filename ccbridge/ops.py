"""Operator tools that work on the bus itself: dead-letter inspection and replay.

A dead letter is the original message, unchanged, on `dlq.<subject>` with headers saying why
(`Ccbridge-Reason`) and where from (`Ccbridge-Original-Subject`).
"""

from __future__ import annotations

import hashlib
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
        stored = raw.subject or ""
        original = headers.get(ORIGINAL_SUBJECT_HEADER, stored.removeprefix(f"{subjects.DLQ_PREFIX}."))
        if subject is None or original == subject:
            letters.append(
                DeadLetter(
                    seq=seq,
                    subject=stored,
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
    """Publish the dead letter back on its original subject; remove it from the DLQ only once the
    new copy is stored (its PubAck came back). Never loses a letter: a failure before the ack
    leaves the letter where it was, and a replay that fails again is dead-lettered anew (a dead
    letter's id names the copy it came from, `shared.broker.dead_letter_msg_id`).

    The replay's Nats-Msg-Id is derived from this letter (sequence, time, body): replaying the
    same letter twice within the stream's duplicate window (a retry after a lost ack) stores it
    once, while any other letter — even one at a reused sequence number — is its own message. The
    consumers are idempotent on the payload's own event_id, so a replay of something already
    processed has no second effect."""
    js = nc.jetstream()
    raw = await js.get_msg(DLQ, seq)
    headers = raw.headers or {}
    original = headers.get(ORIGINAL_SUBJECT_HEADER) or (raw.subject or "").removeprefix(f"{subjects.DLQ_PREFIX}.")
    if original.startswith(f"{subjects.DLQ_PREFIX}."):
        raise ValueError("refusing to replay into the dead-letter stream itself")
    from shared.broker import stream_for

    letter = hashlib.sha256(f"{seq}|{getattr(raw, 'time', None)}|".encode() + (raw.data or b"")).hexdigest()[:24]
    ack = await js.publish(
        original, raw.data or b"", headers={subjects.MSG_ID_HEADER: f"replay-{seq}-{letter}"}, stream=stream_for(original)
    )
    if not ack.stream or ack.seq is None:  # no PubAck: keep the letter
        raise RuntimeError(f"the replay of {seq} was not acknowledged; the dead letter stays")
    await js.delete_msg(DLQ, seq)
    return original
