"""Run a use case the way its subscriber does — through the real delivery policy
(shared.delivery) with a stand-in JetStream message — and say what became of the message.

    outcome = await settle(lambda: injector.run(event), final, policy=policy(), delivered=2)
    isinstance(outcome, Done | Retry | Failed)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.delivery import Backoff, Breakers, Delivery, DeliveryPolicy


@dataclass(frozen=True)
class Done:
    """Acked; `result` is what the work returned."""

    result: Any


@dataclass(frozen=True)
class Retry:
    """Nacked: JetStream redelivers after `delay`."""

    delay: float
    error: BaseException | None


@dataclass(frozen=True)
class Failed:
    """Terminated after the final report (`reports`: what `final` returned); `exhausted`: the
    retries ran out (then it was dead-lettered first)."""

    error: BaseException
    detail: str
    exhausted: bool
    reports: Any

    @property
    def event(self) -> Any:
        """The failed event the use case published (its report)."""
        return self.reports


@dataclass
class Letters:
    kept: list[tuple[str, bytes, str, str]] = field(default_factory=list)

    async def dead_letter(self, subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None:
        self.kept.append((subject, body, reason, message_id))


@dataclass
class Message:
    settled: list[Any] = field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append(("ack", None))

    async def nack(self, delay: float | None = None) -> None:
        self.settled.append(("nack", delay))

    async def reject(self) -> None:
        self.settled.append(("reject", None))

    async def in_progress(self) -> None:
        pass


def policy(*, letters: Letters | None = None, window_s: float = 300.0, max_deliver: int = 0,
           breakers: Breakers | None = None, backoff: Backoff = Backoff(1.0, 30.0, jitter=False)) -> DeliveryPolicy:
    return DeliveryPolicy(breakers=breakers or Breakers(probe_interval_s=0.01, max_probe_interval_s=0.05),
                          dead_letters=letters or Letters(), window_s=window_s, max_deliver=max_deliver,
                          backoff=backoff, ack_wait_s=30.0)


async def settle(work: Callable[[], Awaitable[Any]], final: Callable[[BaseException, str, bool], Awaitable[Any]], *,
                 policy: DeliveryPolicy, delivered: int = 1, age_s: float = 0.0, needs: tuple[str, ...] = (),
                 subject: str = "sandbox.created", body: bytes = b"{}") -> Done | Retry | Failed:
    seen: dict[str, Any] = {}

    async def tracked() -> None:
        try:
            seen["result"] = await work()
        except BaseException as exc:
            seen["error"] = exc
            raise

    async def reported(error: BaseException, detail: str, exhausted: bool) -> None:
        seen["final"] = (error, detail, exhausted)
        seen["reports"] = await final(error, detail, exhausted)

    message = Message()
    delivery = Delivery(subject=subject, body=body, delivered=delivered, stream_seq=1,
                        stored_at=datetime.now(UTC) - timedelta(seconds=age_s), message_id="evt-test")
    await policy.handle(message, tracked, final=reported, needs=needs, delivery=delivery)
    [(kind, value)] = message.settled
    if kind == "ack":
        return Done(seen.get("result"))
    if kind == "nack":
        return Retry(value, seen.get("error"))
    error, detail, exhausted = seen["final"]
    return Failed(error, detail, exhausted, seen.get("reports"))
