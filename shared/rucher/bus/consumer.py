"""Durable pull consumers: the one place where a handler's outcome becomes ack, nak or term."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api

from rucher.bus.client import MSG_ID, Bus, new_id
from rucher.bus.codec import decode
from rucher.bus.errors import RucherError
from rucher.bus.kv import KV
from rucher.proto.bus import MESSAGE_REJECTED, AppliedCommand, MessageRejected
from rucher.proto.errors import ErrorCode
from rucher.proto.keys import make_key
from rucher.proto.streams import IDEMPOTENCY, StreamDef

T = TypeVar("T")

log = structlog.get_logger("rucher.bus.consumer")


@dataclass(frozen=True)
class Delivery:
    """What a handler knows about the message it handles."""

    subject: str
    stream_seq: int
    attempt: int
    msg_id: str | None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[T, Delivery], Awaitable[None]]


def redelivery_delay(attempt: int) -> float:
    """Backoff before the next delivery of a message whose handling failed transiently."""
    return float(min(30.0, 0.5 * 2 ** (attempt - 1)))


class Consumer(Generic[T]):
    """A durable pull consumer running one handler over one stream filter.

    Outcomes: success → ack; a retryable :class:`RucherError` or an unexpected exception → nak
    with backoff; a permanent error, an undecodable payload, or the last allowed delivery → term,
    plus a ``bus.message_rejected`` event carrying the reason. With ``dedupe``, a message whose
    ``Nats-Msg-Id`` was already handled by this consumer is acked without running the handler.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: StreamDef,
        durable: str,
        filter_subject: str,
        payload: Any,
        handler: Handler[T],
        max_deliver: int = 8,
        ack_wait: float = 30.0,
        batch: int = 64,
        dedupe: bool = False,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.payload = payload
        self.handler = handler
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.batch = batch
        self.dedupe = dedupe
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._seen: KV[AppliedCommand] | None = None
        self.handled = 0
        self.rejected = 0

    async def start(self) -> None:
        """Create (or bind to) the durable consumer and start pulling."""
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=self.filter_subject,
            max_ack_pending=1000,
        )
        self._sub = await self.bus.js.pull_subscribe(
            self.filter_subject, durable=self.durable, stream=self.stream.name, config=config
        )
        if self.dedupe:
            self._seen = KV(self.bus, IDEMPOTENCY, AppliedCommand)
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self.durable}")

    async def stop(self) -> None:
        """Finish the message in hand, then stop pulling."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                messages = await self._sub.fetch(self.batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except nats.js.errors.Error as err:
                # The stream leader may be moving (a NATS node died): back off and pull again.
                log.warning("consumer_fetch_failed", durable=self.durable, error=repr(err))
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        attempt = meta.num_delivered
        headers = dict(msg.headers or {})
        delivery = Delivery(
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            attempt=attempt,
            msg_id=headers.get(MSG_ID),
            headers=headers,
        )
        seen_key = make_key(self.durable, delivery.msg_id) if delivery.msg_id else None
        try:
            if self._seen is not None and seen_key and await self._seen.get(seen_key):
                await msg.ack()
                return
            message = decode(msg.data, self.payload)
            await self.handler(message, delivery)
            if self._seen is not None and seen_key:
                record = AppliedCommand(
                    applier=self.durable, time=time.time(), stream_seq=delivery.stream_seq
                )
                await self._seen.put(seen_key, record)
        except RucherError as err:
            if err.retryable and attempt < self.max_deliver:
                await msg.nak(delay=redelivery_delay(attempt))
                return
            await self._reject(msg, delivery, f"{err.code}: {err.message}")
            return
        except Exception as err:
            log.exception("consumer_handler_failed", durable=self.durable, subject=msg.subject)
            if attempt < self.max_deliver:
                await msg.nak(delay=redelivery_delay(attempt))
                return
            await self._reject(
                msg, delivery, f"{ErrorCode.INTERNAL}: {err!r} (after {attempt} deliveries)"
            )
            return
        self.handled += 1
        await msg.ack()

    async def _reject(self, msg: Msg, delivery: Delivery, reason: str) -> None:
        await msg.term()
        self.rejected += 1
        log.warning("message_rejected", durable=self.durable, subject=msg.subject, reason=reason)
        event = MessageRejected(
            event_id=new_id(),
            node=self.bus.node,
            time=time.time(),
            subject=delivery.subject,
            stream=self.stream.name,
            consumer=self.durable,
            stream_seq=delivery.stream_seq,
            reason=reason,
            service=self.bus.service,
        )
        # Rejections of EVENTS messages are themselves events: never feed them back to ourselves.
        with contextlib.suppress(RucherError):
            await self.bus.publish(MESSAGE_REJECTED.to(node=self.bus.node), event)


async def consume(
    bus: Bus,
    *,
    stream: StreamDef,
    durable: str,
    filter_subject: str,
    payload: Any,
    handler: Handler[T],
    **options: Any,
) -> Consumer[T]:
    """Start a :class:`Consumer`; ``payload`` may be a type or a tagged union of types."""
    consumer: Consumer[T] = Consumer(
        bus,
        stream=stream,
        durable=durable,
        filter_subject=filter_subject,
        payload=payload,
        handler=handler,
        **options,
    )
    await consumer.start()
    return consumer
