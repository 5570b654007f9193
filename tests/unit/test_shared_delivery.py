"""The one delivery policy (shared/delivery.py): what happens to a message whose processing
failed — held while a dependency is down, nacked with backoff, or dead-lettered and reported
once its retry window has run out — and the circuit breakers behind "held"."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.broker import dead_letter_msg_id
from shared.delivery import Backoff, Breaker, Breakers, Delivery, DeliveryPolicy

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


class DependencyDown(Exception):
    reason, retryable = "vault_unavailable", True

    def __init__(self, dependency: str = "vault") -> None:
        super().__init__(f"{dependency} down")
        self.dependency, self.detail = dependency, f"{dependency} down"


class Transient(Exception):
    reason, retryable, detail = "backend_error", True, "disk full"


class Final(Exception):
    reason, retryable, detail = "not_connected", False, "no connection"


@dataclass
class Message:
    outcomes: list[Any] = field(default_factory=list)
    beats: int = 0

    async def ack(self) -> None:
        self.outcomes.append("ack")

    async def nack(self, delay: float | None = None) -> None:
        self.outcomes.append(("nack", delay))

    async def reject(self) -> None:
        self.outcomes.append("reject")

    async def in_progress(self) -> None:
        self.beats += 1


@dataclass
class Letters:
    kept: list[tuple[str, bytes, str, str]] = field(default_factory=list)
    fail: bool = False

    async def dead_letter(self, subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None:
        if self.fail:
            raise ConnectionError("bus down")
        self.kept.append((subject, body, reason, message_id))


@dataclass
class World:
    now: datetime = T0
    letters: Letters = field(default_factory=Letters)
    reports: list[tuple[str, str, bool]] = field(default_factory=list)
    breakers: Breakers = field(default_factory=lambda: Breakers(probe_interval_s=0.01, max_probe_interval_s=0.05))

    def policy(self, **kwargs: Any) -> DeliveryPolicy:
        return DeliveryPolicy(breakers=self.breakers, dead_letters=self.letters, backoff=Backoff(1, 30, jitter=False),
                              clock=lambda: self.now, ack_wait_s=0.3, **kwargs)

    async def final(self, exc: BaseException, detail: str, exhausted: bool) -> None:
        self.reports.append((type(exc).__name__, detail, exhausted))


def delivery(delivered: int = 1, age_s: float = 0.0) -> Delivery:
    return Delivery(subject="sandbox.created", body=b'{"x":1}', delivered=delivered, stream_seq=42,
                    stored_at=T0 - timedelta(seconds=age_s), message_id="evt-1")


async def test_success_acks() -> None:
    world, msg = World(), Message()
    await world.policy().handle(msg, _returns(None), final=world.final, delivery=delivery())
    assert msg.outcomes == ["ack"] and world.letters.kept == [] and world.reports == []


async def test_a_transient_error_is_nacked_with_one_backoff_inside_the_window() -> None:
    world = World()
    for delivered, expected in ((1, 1.0), (2, 2.0), (4, 8.0), (9, 30.0)):
        msg = Message()
        await world.policy(window_s=300).handle(msg, _raises(Transient()), final=world.final,
                                                delivery=delivery(delivered, age_s=10))
        assert msg.outcomes == [("nack", expected)]
    assert world.letters.kept == [] and world.reports == []


async def test_out_of_the_window_a_retryable_error_is_final_dead_lettered_and_reported() -> None:
    world, msg = World(), Message()
    await world.policy(window_s=300).handle(msg, _raises(Transient()), final=world.final,
                                            delivery=delivery(7, age_s=301))
    assert msg.outcomes == ["reject"]
    [(subject, body, reason, letter_id)] = world.letters.kept
    assert (subject, body, letter_id) == ("sandbox.created", b'{"x":1}', "evt-1")
    assert reason.startswith("backend_error: disk full (still failing after 301 s, 7 deliveries)")
    assert world.reports == [("Transient", "disk full (still failing after 301 s, 7 deliveries)", True)]


async def test_a_final_error_is_reported_at_once_without_a_dead_letter() -> None:
    world, msg = World(), Message()
    await world.policy().handle(msg, _raises(Final()), final=world.final, delivery=delivery())
    assert msg.outcomes == ["reject"] and world.letters.kept == []
    assert world.reports == [("Final", "no connection", False)]


async def test_an_unexpected_error_is_retried_then_poison() -> None:
    world = World()
    msg = Message()
    await world.policy(poison_after=3).handle(msg, _raises(KeyError("bug")), final=world.final, delivery=delivery(2))
    assert msg.outcomes == [("nack", 2.0)]
    msg = Message()
    await world.policy(poison_after=3).handle(msg, _raises(KeyError("bug")), final=world.final, delivery=delivery(3))
    assert msg.outcomes == ["reject"] and len(world.letters.kept) == 1 and world.reports[0][2] is True


async def test_when_the_report_cannot_be_sent_the_message_comes_back() -> None:
    world, msg = World(), Message()
    world.letters.fail = True
    await world.policy(window_s=1).handle(msg, _raises(Transient()), final=world.final, delivery=delivery(3, age_s=5))
    assert msg.outcomes == [("nack", 4.0)] and world.reports == []


async def test_while_a_dependency_is_down_the_message_is_held_then_done_without_a_nack() -> None:
    """No redelivery and no retry budget spent: the handler waits (sending in-progress), one
    probe at a time, and finishes once the dependency answers."""
    world, msg = World(), Message()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise DependencyDown()

    await world.policy(window_s=300).handle(msg, work, final=world.final, delivery=delivery(age_s=1))
    assert msg.outcomes == ["ack"] and calls == 4
    assert world.breakers["vault"].state == "closed" and world.breakers["vault"].paused_s > 0


async def test_below_open_after_a_dependency_error_is_this_messages_own_retry() -> None:
    """One sandbox's unreachable envd is not an e2b outage: the message is nacked with its own
    backoff, nobody else is paused."""
    world, msg = World(breakers=Breakers(probe_interval_s=0.01, open_after={"e2b": 3})), Message()
    await world.policy(window_s=300).handle(msg, _raises(DependencyDown("e2b")), final=world.final,
                                            delivery=delivery(age_s=1))
    assert msg.outcomes == [("nack", 1.0)] and world.breakers["e2b"].state == "closed"


async def test_a_message_being_worked_on_tells_jetstream_so() -> None:
    world, msg = World(), Message()

    async def slow() -> None:
        await asyncio.sleep(0.5)

    await world.policy().handle(msg, slow, final=world.final, delivery=delivery())  # ack wait 0.3 s: a beat / 0.2 s
    assert msg.beats >= 2 and msg.outcomes == ["ack"]


async def test_other_messages_that_need_the_dependency_wait_and_only_one_probes() -> None:
    world = World()
    up = asyncio.Event()
    attempts: list[int] = []

    async def work(n: int) -> None:
        attempts.append(n)
        if not up.is_set():
            raise DependencyDown()

    policy = world.policy(window_s=300)
    first = Message()
    held = asyncio.create_task(policy.handle(first, lambda: work(0), final=world.final, delivery=delivery()))
    await asyncio.sleep(0.03)
    assert world.breakers["vault"].state in ("open", "half_open")
    others = [Message() for _ in range(5)]
    waiting = [asyncio.create_task(policy.handle(m, lambda i=i: work(i + 1), final=world.final, needs=("vault",),
                                                 delivery=delivery())) for i, m in enumerate(others)]
    await asyncio.sleep(0.2)
    assert set(attempts) <= {0, 1, 2, 3, 4, 5}
    assert len(attempts) < 20  # probes are spaced, not a busy loop
    up.set()
    await asyncio.wait_for(asyncio.gather(held, *waiting), 5)
    assert [m.outcomes for m in (first, *others)] == [["ack"]] * 6


async def test_a_dependency_down_past_the_window_is_final() -> None:
    world, msg = World(), Message()
    await world.policy(window_s=60).handle(msg, _raises(DependencyDown()), final=world.final,
                                           delivery=delivery(age_s=61))
    assert msg.outcomes == ["reject"] and world.reports[0][2] is True
    assert "still failing after 61 s" in world.reports[0][1]


async def test_a_breaker_admits_one_probe_per_interval() -> None:
    clock = [0.0]
    breaker = Breaker("vault", probe_interval_s=1.0, max_probe_interval_s=4.0, clock=lambda: clock[0])
    assert await breaker.admit() is False  # closed: go
    breaker.failed()
    waiter = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.06)
    assert not waiter.done()
    clock[0] = 1.0
    assert await asyncio.wait_for(waiter, 2) is True and breaker.state == "half_open"
    breaker.failed()  # the probe failed: the next probe waits twice as long
    clock[0] = 2.5
    second = asyncio.create_task(breaker.admit())
    await asyncio.sleep(0.06)
    assert not second.done()
    breaker.succeeded()
    assert await asyncio.wait_for(second, 2) is False and breaker.state == "closed"


def test_open_after_needs_that_many_failures_in_a_row() -> None:
    breaker = Breaker("e2b", open_after=3)
    breaker.failed()
    breaker.failed()
    breaker.succeeded()  # somebody else's call got through: the count starts over
    breaker.failed()
    breaker.failed()
    assert breaker.state == "closed" and breaker.try_admit()
    breaker.failed()
    assert breaker.state == "open" and not breaker.try_admit()


def _returns(value: Any) -> Any:
    async def work() -> Any:
        return value

    return work


def _raises(exc: BaseException) -> Any:
    async def work() -> None:
        raise exc

    return work


def test_a_dead_letters_id_names_the_message_and_its_copy() -> None:
    """Redeliveries of one copy share the id (kept once, however often dead-lettering is
    retried); a replayed copy (a new stream sequence) that fails again is a new letter."""
    def letter_id(message_id: str | None, seq: int, delivered: int, body: bytes = b"b") -> str:
        delivery = Delivery(subject="s", body=body, delivered=delivered, stream_seq=seq, message_id=message_id)
        return dead_letter_msg_id(delivery.subject, delivery.dead_letter_id(), delivery.stream_seq)

    assert letter_id("evt-9", 5, 1) == letter_id("evt-9", 5, 7) == "dlq-s-evt-9-5"
    assert letter_id("evt-9", 6, 1) != letter_id("evt-9", 5, 1)
    assert letter_id(None, 5, 1) == letter_id(None, 5, 2) != letter_id(None, 5, 1, body=b"other")
