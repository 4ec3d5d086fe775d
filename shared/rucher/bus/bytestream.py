"""Interactive byte streams (consoles) over core NATS: ordered frames, credit, heartbeats.

Both ends of a session are a :class:`ByteStream`: it publishes ``ByteFrame`` messages on its
outgoing subject and reads them from its incoming one (proto/README.md, "Bytes that do not fit
in a message"). A gap in ``seq``, a peer's ``close``, or ``idle`` seconds without any frame ends
the session; the reason is then in :attr:`ByteStream.closed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rucher.bus.client import flush_in_order
from rucher.bus.codec import decode, encode
from rucher.bus.errors import RucherError
from rucher.proto.bus import ByteFrame
from rucher.proto.errors import ErrorCode

log = structlog.get_logger("rucher.bus.bytestream")

FRAME_MAX = 64 * 1024
WINDOW = 1024 * 1024
ACK_EVERY = 256 * 1024
HEARTBEAT = 10.0
IDLE = 30.0


class StreamClosedError(Exception):
    """The session ended; ``reason`` says why (the peer's reason, ``idle``, ``gap``...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ByteStream:
    """One end of a byte-stream session: ``send`` and ``receive`` bytes, ``close`` it."""

    def __init__(
        self,
        nc: Client,
        *,
        outgoing: str,
        incoming: str,
        window: int = WINDOW,
        ack_every: int = ACK_EVERY,
        heartbeat: float = HEARTBEAT,
        idle: float = IDLE,
    ) -> None:
        self.nc = nc
        self.outgoing = outgoing
        self.incoming = incoming
        self.window = window
        self.ack_every = ack_every
        self.heartbeat = heartbeat
        self.idle = idle
        self.closed: str | None = None
        self._seq = 0
        self._expected = 1
        self._sent = 0
        self._acked = 0
        self._consumed = 0
        self._last_ack_sent = 0
        self._last_seen = time.monotonic()
        self._first = asyncio.Event()
        self._attached = False
        self._credit = asyncio.Condition()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._subscription: Subscription | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Subscribe to the incoming subject and start the heartbeat; call before the peer sends."""
        self._subscription = await self.nc.subscribe(self.incoming, cb=self._on_message)
        await flush_in_order(self.nc)
        self._keeper = asyncio.create_task(self._keep(), name=f"bytestream-{self.incoming}")

    async def wait_first(self, timeout: float) -> None:
        """Wait until the peer's first frame, or raise :class:`StreamClosedError`."""
        try:
            async with asyncio.timeout(timeout):
                await self._first.wait()
        except TimeoutError:
            await self.close(f"the peer sent nothing within {timeout:g} s")
        if not self._attached:
            raise StreamClosedError(self.closed or "closed")

    async def send(self, data: bytes) -> None:
        """Send ``data`` in frames of at most 64 KiB, waiting for credit when the window is full."""
        for start in range(0, len(data), FRAME_MAX):
            chunk = data[start : start + FRAME_MAX]
            async with self._credit:
                await self._credit.wait_for(
                    lambda: self.closed is not None or self._sent - self._acked < self.window
                )
            if self.closed is not None:
                raise StreamClosedError(self.closed)
            self._sent += len(chunk)
            await self._publish(data=chunk)

    async def ping(self) -> None:
        """Send a heartbeat now (the gateway's first frame tells the agent a client is there)."""
        if self.closed is not None:
            raise StreamClosedError(self.closed)
        await self._publish()

    async def receive(self) -> bytes:
        """The next bytes from the peer; raises :class:`StreamClosedError` once it has ended."""
        if self.closed is not None and self._queue.empty():
            raise StreamClosedError(self.closed)
        data = await self._queue.get()
        if data is None:
            raise StreamClosedError(self.closed or "closed")
        self._consumed += len(data)
        if self._consumed - self._last_ack_sent >= self.ack_every:
            self._last_ack_sent = self._consumed
            await self._publish(ack=self._consumed)
        return data

    async def close(self, reason: str) -> None:
        """End the session, telling the peer why (best effort); closing twice changes nothing."""
        if self.closed is None:
            with contextlib.suppress(RucherError):
                await self._publish(close=reason)
        await self._end(reason)
        closer = self._closer
        if closer is not None and asyncio.current_task() is not self._keeper:
            await asyncio.shield(closer)

    async def _end(self, reason: str) -> None:
        # Unsubscribing runs in its own task: this may run inside the subscription's callback,
        # which unsubscribing cancels.
        if self.closed is None:
            self.closed = reason
            log.info("byte_stream_closed", subject=self.incoming, reason=reason)
        self._first.set()
        self._queue.put_nowait(None)
        async with self._credit:
            self._credit.notify_all()
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            self._closer = asyncio.create_task(self._drop(subscription))

    async def _drop(self, subscription: Subscription) -> None:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
        keeper = self._keeper
        if keeper is not None and not keeper.done():
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _publish(
        self, *, data: bytes = b"", ack: int | None = None, close: str | None = None
    ) -> None:
        self._seq += 1
        frame = ByteFrame(seq=self._seq, data=data, ack=ack, close=close)
        try:
            await self.nc.publish(self.outgoing, encode(frame))
            # nats-py writes a publish only when its flusher is kicked, and a publish made while
            # a kick is already queued can sit in the buffer until the next one: a console
            # frame (the first ping included) must leave now, so wait until the server has it.
            await flush_in_order(self.nc)
        except nats.errors.Error as err:
            raise RucherError(ErrorCode.UNAVAILABLE, f"console frame not sent: {err}") from err

    async def _on_message(self, message: Msg) -> None:
        if self.closed is not None:
            return
        try:
            frame = decode(message.data, ByteFrame)
        except RucherError as err:
            await self.close(f"malformed frame: {err.message}")
            return
        if frame.seq != self._expected:
            await self.close(f"frame {self._expected} lost (got {frame.seq})")
            return
        self._expected += 1
        self._last_seen = time.monotonic()
        if frame.close is None:
            self._attached = True
        self._first.set()
        if frame.ack is not None:
            async with self._credit:
                self._acked = max(self._acked, frame.ack)
                self._credit.notify_all()
        if frame.data:
            self._queue.put_nowait(frame.data)
        if frame.close is not None:
            await self._end(frame.close)

    async def _keep(self) -> None:
        """Heartbeat every ``heartbeat`` s; close after ``idle`` s without a frame."""
        while self.closed is None:
            await asyncio.sleep(min(self.heartbeat, self.idle))
            if time.monotonic() - self._last_seen > self.idle:
                await self.close(f"no frame for {self.idle:g} s")
                return
            with contextlib.suppress(RucherError):
                await self._publish()
