"""FastStream NATS wiring shared by the services: broker factory, streams, publishing,
dead letters. Nothing here connects at import time."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping
from typing import Annotated, Any

import nats
import nats.errors
import nats.js
from faststream import ExceptionMiddleware
from faststream._internal.context import Context
from faststream.nats import JStream, NatsBroker, StorageType
from faststream.nats.broker import NatsBroker as _Broker
from faststream.nats.message import NatsMessage as _Message
from nats.js import api as js_api
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import BaseModel

from shared import subjects
from shared.events import Event
from shared.settings import ServiceSettings
from shared.subjects import ALL_STREAMS, MSG_ID_HEADER, StreamSpec
from shared.tracing import telemetry_middlewares

log = logging.getLogger(__name__)


class AsyncContext(Context):
    """FastStream's `Context` field, resolved on the event loop. fast_depends runs a custom
    field's *sync* `use` in a worker thread, so FastStream's own `NatsMessage` / `NatsBroker`
    annotations cost every message a thread hop (measured: the sandbox's busiest thread pool)."""

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]  # async on purpose (above)
        return super().use(**kwargs)


Message = Annotated[_Message, AsyncContext("message")]
"""The message being handled (as `faststream.nats.NatsMessage`, without the thread hop)."""
Broker = Annotated[_Broker, AsyncContext("broker")]
"""The broker handling it (as `faststream.nats.NatsBroker`, without the thread hop)."""

def restore_fetch_timeout_contract() -> None:
    """Make `PullSubscription.fetch` raise `nats.errors.TimeoutError` on every timeout again.

    nats-py 2.15+ (nats-io/nats.py#934) raises a *bare* `asyncio.TimeoutError` when its deadline
    runs out between the no-wait probe and the lingering pull — the normal outcome of a fetch on an
    idle consumer. nats-py documents `nats.errors.TimeoutError` (a subclass; upstream fix:
    nats-io/nats.py#1008), and FastStream's pull loop suppresses only that one: the bare one ended
    the loop task, FastStream's supervisor logged it at ERROR with a traceback ("Task-N raised an
    exception, retrying…") and started it again, at every start of every service and 0.1 to 2
    times a second under load — and kept every ended task, with its traceback and frames (~2 KB),
    in `subscriber.tasks` for the life of the process (docs/performance.md, "Memory"). Callers
    that catch `asyncio.TimeoutError` still catch what is raised now. Idempotent; applied when
    this module is imported, i.e. in every service."""
    pull = JetStreamContext.PullSubscription
    if getattr(pull.fetch, "_ccbridge_timeout_contract", False):
        return
    original = pull.fetch

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:  # the bare one: an empty fetch, nothing else
            raise nats.errors.TimeoutError from exc

    fetch._ccbridge_timeout_contract = True  # type: ignore[attr-defined]  # marks the patch as applied
    pull.fetch = fetch  # type: ignore[method-assign]  # the patch itself (docstring above)


restore_fetch_timeout_contract()


class _TaskSupervisorChatter(logging.Filter):
    """FastStream's task supervisor logs "callback for Task-N is being executed..." at INFO each
    time one of a subscriber's tasks ends (a stop, a restart): bookkeeping, not news. Demoted to
    DEBUG (shown with LOG_LEVEL=DEBUG). Its ERROR line about a task that failed stays as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith("callback for ") \
                and str(record.msg).endswith("is being executed..."):
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def bus_logger(name: str) -> logging.Logger:
    """The logger of service `name`'s broker (FastStream logs through it)."""
    logger = logging.getLogger(f"ccbridge.{name}.bus")
    if not any(isinstance(f, _TaskSupervisorChatter) for f in logger.filters):
        logger.addFilter(_TaskSupervisorChatter())
    return logger


REASON_HEADER = "Ccbridge-Reason"
ORIGINAL_SUBJECT_HEADER = "Ccbridge-Original-Subject"


def jstream(spec: StreamSpec, *, replicas: int = 1) -> JStream:
    """FastStream's view of a stream; `declare=False` because `ensure_streams` owns creation."""
    return JStream(
        spec.name,
        subjects=list(spec.subjects),
        duplicate_window=spec.duplicate_window_s,
        max_age=spec.max_age_s,
        storage=StorageType.FILE,
        num_replicas=replicas,
        declare=False,
    )


TOKENS = jstream(subjects.TOKENS_STREAM)
SANDBOX = jstream(subjects.SANDBOX_STREAM)
DLQ = jstream(subjects.DLQ_STREAM)


def stream_for(subject: str) -> str:
    for spec in ALL_STREAMS:
        for pattern in spec.subjects:
            if subject.startswith(pattern.removesuffix(">")):
                return spec.name
    raise ValueError(f"no stream holds {subject}")


class CcbridgeBroker(NatsBroker):
    """A NatsBroker whose durable pull subscribers fetch into the connection's own inbox prefix.

    FastStream hands every pull subscriber `inbox_prefix=b"_INBOX."` unless told otherwise, which
    ignores the connection's prefix: fetched messages (sealed tokens, for the vault) would land on
    `_INBOX.<nuid>`, a subject this service's NATS user may not subscribe to — and must not, as it
    would let every user read everyone's. Rewriting FastStream's default at start covers every
    subscriber, routers' included, without each one having to remember."""

    def __init__(self, *args: Any, inbox_prefix: str, **kwargs: Any) -> None:
        super().__init__(*args, inbox_prefix=inbox_prefix, **kwargs)
        self.inbox_prefix = inbox_prefix

    def own_pull_inboxes(self) -> None:
        own = f"{self.inbox_prefix}.".encode()
        for subscriber in self.subscribers:
            options = getattr(subscriber, "extra_options", None)
            if isinstance(options, dict) and options.get("inbox_prefix") == js_api.INBOX_PREFIX:
                options["inbox_prefix"] = own

    async def start(self) -> None:
        self.own_pull_inboxes()
        await super().start()


def make_broker(
    settings: ServiceSettings, *, name: str, middlewares: tuple = (), inbox_prefix: str | None = None
) -> CcbridgeBroker:
    """The broker of service `name`, replying on `NATS_INBOX_PREFIX`, else `inbox_prefix`, else
    `_INBOX.ccbridge-<name>` (what deploy/nats/accounts.conf grants the user of that name)."""
    return CcbridgeBroker(
        settings.nats_servers,
        inbox_prefix=settings.nats_inbox_prefix or inbox_prefix or subjects.inbox_prefix(name),
        name=f"ccbridge-{name}",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        middlewares=(*telemetry_middlewares(name), *middlewares),
        logger=bus_logger(name),
        log_level=logging.DEBUG,
    )


async def settle(nc: nats.NATS) -> None:
    """Return once the server has processed everything this connection sent so far — above all
    its SUBs, so that what another connection publishes next is routed here.

    One `flush()` does not promise that: nats-py (2.16) writes flush's PING straight to the
    socket, ahead of commands still queued for its flusher task, so the PONG can arrive before a
    SUB just made has left the process. That PING also kicks the flusher, which writes the queue
    before the PONG is read; the second PING therefore follows the SUB on the wire, and its PONG
    proves the server has it."""
    await nc.flush()
    await nc.flush()


def _stream_config(spec: StreamSpec, replicas: int, max_bytes: int) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        duplicate_window=spec.duplicate_window_s,
        max_age=spec.max_age_s,
        max_bytes=max_bytes,
        discard=DiscardPolicy(spec.discard),
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
    )


def _matches(current: StreamConfig, wanted: StreamConfig) -> bool:
    return (
        sorted(current.subjects or []) == sorted(wanted.subjects or [])
        and current.duplicate_window == wanted.duplicate_window
        and current.max_age == wanted.max_age
        and current.max_bytes == wanted.max_bytes
        and current.discard == wanted.discard
        and (current.num_replicas or 1) == wanted.num_replicas
    )


DEFAULT_STREAM_MAX_BYTES = 1 << 30


async def ensure_streams(
    js: nats.js.JetStreamContext, *, replicas: int = 1, max_bytes: int = DEFAULT_STREAM_MAX_BYTES, attempts: int = 5
) -> None:
    """Create or update every ccbridge stream. Safe to call from every replica at start.

    A stream that already has the wanted config is left alone (an update is a cluster-wide
    operation); timeouts — a cluster electing a leader, a loaded server — are retried."""
    for spec in ALL_STREAMS:
        wanted = _stream_config(spec, replicas, max_bytes)
        for attempt in range(1, attempts + 1):
            try:
                await _ensure_stream(js, wanted)
                break
            except nats.errors.TimeoutError:
                if attempt == attempts:
                    raise
                log.warning("stream provisioning timed out; retrying (stream=%s, attempt=%d)", spec.name, attempt)
                await asyncio.sleep(0.5 * attempt)


async def _ensure_stream(js: nats.js.JetStreamContext, wanted: StreamConfig) -> None:
    assert wanted.name is not None  # _stream_config names every stream
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        try:
            await js.add_stream(wanted)
            return
        except BadRequestError:  # another replica created it first
            info = await js.stream_info(wanted.name)
    if not _matches(info.config, wanted):
        await js.update_stream(wanted)


async def provision(broker: NatsBroker, settings: ServiceSettings) -> None:
    await ensure_streams(
        broker.connection.jetstream(), replicas=settings.stream_replicas, max_bytes=settings.stream_max_bytes
    )


async def publish_event(broker: NatsBroker, subject: str, event: Event) -> None:
    """Publish to JetStream and wait for the ack; `Nats-Msg-Id` = event_id for dedupe."""
    await broker.publish(
        event.model_dump(mode="json"),
        subject,
        headers={MSG_ID_HEADER: event.event_id},
        stream=stream_for(subject),
        timeout=5.0,
    )


def dead_letter_msg_id(subject: str, message_id: str, copy_seq: int | None = None) -> str:
    """Dedupe id of a dead letter: per subject (one bad body on two subjects is two letters) and
    per copy of the message on the bus (`copy_seq`, its stream sequence). Redeliveries of one copy
    share the id — JetStream keeps one letter however often the dead-lettering is retried — while
    a replayed copy that fails again is a new letter, never dropped as a duplicate of the first."""
    base = f"dlq-{subject}-{message_id}"
    return f"{base}-{copy_seq}" if copy_seq else base


async def dead_letter(
    broker: NatsBroker, subject: str, body: bytes, reason: str, *, message_id: str | None = None,
    copy_seq: int | None = None,
) -> None:
    """Keep a message we cannot process, unchanged, on `dlq.<subject>` with why. `copy_seq`: the
    stream sequence of the copy being given up on (`shared.delivery.Delivery.stream_seq`)."""
    headers = {REASON_HEADER: reason[:200], ORIGINAL_SUBJECT_HEADER: subject}
    if message_id:
        headers[MSG_ID_HEADER] = dead_letter_msg_id(subject, message_id, copy_seq)
    await broker.publish(body, subjects.dead_letter_subject(subject), headers=headers, stream=subjects.DLQ_STREAM.name)


class BrokerDeadLetters:
    """`shared.delivery.DeadLetterSink` over `dead_letter` (one letter per copy of a message)."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def dead_letter(self, subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None:
        await dead_letter(self._broker, subject, body, reason, message_id=message_id, copy_seq=copy_seq)


def document_publishers(broker: NatsBroker, published: Mapping[str, type[BaseModel]]) -> None:
    """Declare what a service publishes, so FastStream's AsyncAPI shows its outgoing channels
    with their payload schemas. Publishing itself goes through `publish_event`."""
    for subject, model in published.items():
        broker.publisher(subject, schema=model, title=f"{subject}:{model.__name__}", description=model.__doc__)


__all__ = [
    "DLQ",
    "SANDBOX",
    "CcbridgeBroker",
    "TOKENS",
    "ExceptionMiddleware",
    "dead_letter",
    "ensure_streams",
    "make_broker",
    "provision",
    "publish_event",
    "stream_for",
]
