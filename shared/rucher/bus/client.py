"""The bus client: connection, typed publish, request/reply and RPC serving over nats-py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, RawStreamMsg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from rucher.bus.codec import decode, encode
from rucher.bus.errors import RucherError
from rucher.proto.base import Address, RpcAddress, RpcSubject
from rucher.proto.errors import ErrorCode, ErrorReply

T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

MSG_ID = "Nats-Msg-Id"
ERROR_HEADER = "Rucher-Error"
NODE_HEADER = "Rucher-Node"
TRACE_HEADER = "Rucher-Trace"

RpcHandler = Callable[[T, dict[str, str]], Awaitable[R]]

log = structlog.get_logger("rucher.bus")


class Bus:
    """One process's connection to the cluster bus.

    Publishing an event goes to JetStream with ``Nats-Msg-Id`` so a retry is stored once;
    requests travel over core NATS with typed error replies; RPC handlers are NATS micro-service
    endpoints, so ``$SRV.PING|INFO|STATS`` discover them.
    """

    def __init__(self, nc: Client, *, node: str, service: str, version: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        # Direct reads are answered by any replica in milliseconds; one sent to a server that
        # cannot be reached (a route not yet known dead) is given up early and sent again.
        self.js_read: JetStreamContext = nc.jetstream(timeout=DIRECT_READ_TIMEOUT)
        self.node = node
        self.service = service
        self.version = version
        self._micro: Service | None = None
        self._micro_lock = asyncio.Lock()
        self._handler_tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        servers: str | list[str],
        *,
        node: str,
        service: str,
        version: str = "0.1.0",
        connect_timeout: float = 5.0,
    ) -> Bus:
        """Connect to one URL or a cluster, reconnecting forever once connected.

        Servers are tried in the order given: a node's services list their own node's server
        first, so they use it while it runs (the HA lease keeps its Raft leader there).
        """

        async def on_error(err: Exception) -> None:
            log.warning("nats_error", error=repr(err))

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):
                log.warning("nats_disconnected")

        async def on_reconnect() -> None:
            log.info(
                "nats_reconnected", server=str(nc.connected_url.netloc if nc.connected_url else "")
            )

        nc = await nats.connect(
            servers=servers if isinstance(servers, list) else servers.split(","),
            name=f"{service}@{node}",
            connect_timeout=connect_timeout,
            dont_randomize=True,
            reconnect_time_wait=0.25,
            max_reconnect_attempts=-1,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        return cls(nc, node=node, service=service, version=version)

    @property
    def server_name(self) -> str:
        """The name of the NATS server this connection is on now ("" when unknown)."""
        return str(self.nc._server_info.get("server_name") or "")

    def cluster_size(self) -> int:
        """How many NATS servers the connected cluster advertises (1 for a lone server)."""
        info = self.nc._server_info
        urls = set(info.get("connect_urls") or [])
        own = f"{info.get('host')}:{info.get('port')}"
        return max(1, len(urls | {own}) if urls else 1)

    # Events and durable commands -----------------------------------------------------------

    def _headers(self, message: msgspec.Struct, msg_id: str | None) -> dict[str, str]:
        ident = msg_id or getattr(message, "event_id", None) or getattr(message, "command_id", None)
        headers = {NODE_HEADER: self.node}
        if ident:
            headers[MSG_ID] = ident
        return headers

    async def publish(self, address: Address[T], message: T, *, msg_id: str | None = None) -> int:
        """Store ``message`` in its stream and return the stream sequence.

        The de-duplication id is ``msg_id``, else the message's ``event_id`` or ``command_id``.
        """
        payload = self._check_and_encode(address, message)
        headers = self._headers(message, msg_id)
        ack = await store(
            self.js, address.subject, payload, headers, deduplicated=MSG_ID in headers
        )
        return int(ack.seq)

    async def publish_async(
        self, address: Address[T], message: T, *, msg_id: str | None = None
    ) -> asyncio.Future[PubAck]:
        """Start storing ``message`` and return a future of its acknowledgement (pipelined)."""
        payload = self._check_and_encode(address, message)
        return await self.js.publish_async(
            address.subject, payload, headers=self._headers(message, msg_id)
        )

    @staticmethod
    def _check_and_encode(address: Address[T] | RpcAddress[T, Any], message: T) -> bytes:
        if not isinstance(message, address.of.payload):
            raise TypeError(
                f"{address.subject} carries {address.of.payload.__name__}, "
                f"not {type(message).__name__}"
            )
        return encode(message)

    # Request / reply ----------------------------------------------------------------------

    async def request(self, address: RpcAddress[T, R], message: T, *, timeout: float = 5.0) -> R:
        """Send a request and return the typed reply, or raise the remote :class:`RucherError`."""
        payload = self._check_and_encode(address, message)
        try:
            reply = await self.nc.request(
                address.subject, payload, timeout=timeout, headers={NODE_HEADER: self.node}
            )
        except nats.errors.NoRespondersError as err:
            raise RucherError(
                ErrorCode.UNAVAILABLE, f"no service answers on {address.subject}"
            ) from err
        except nats.errors.TimeoutError as err:
            raise RucherError(
                ErrorCode.TIMEOUT, f"no reply on {address.subject} within {timeout} s"
            ) from err
        if reply.headers and ERROR_HEADER in reply.headers:
            raise RucherError.from_reply(decode(reply.data, ErrorReply))
        return decode(reply.data, address.of.reply)

    async def serve(
        self,
        subject: RpcSubject[T, R],
        handler: RpcHandler[T, R],
        *,
        concurrent: bool = True,
        **params: str,
    ) -> None:
        """Answer requests on ``subject`` (filled with ``params``) with ``handler``.

        Instances of one service share a queue group, so each request is answered once. A
        handler's :class:`RucherError` becomes an error reply; any other exception becomes an
        ``internal`` error reply and is logged. With ``concurrent``, slow handlers do not hold
        up the next request.
        """
        address = subject.to(**params)
        micro = await self.micro_service()

        async def answer(request: Request) -> None:
            try:
                message = decode(request.data, subject.payload)
                result = await handler(message, request.headers or {})
                await request.respond(encode(result))
            except RucherError as err:
                await request.respond(encode(err.to_reply()), headers={ERROR_HEADER: err.code})
            except Exception as err:
                log.exception("rpc_handler_failed", subject=request.subject, error=repr(err))
                failure = RucherError(ErrorCode.INTERNAL, f"internal error: {err!r}")
                await request.respond(
                    encode(failure.to_reply()), headers={ERROR_HEADER: "internal"}
                )

        async def dispatch(request: Request) -> None:
            if not concurrent:
                await answer(request)
                return
            task = asyncio.create_task(answer(request))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)

        name = address.subject.replace(".", "_").replace("-", "_")
        await micro.add_endpoint(
            EndpointConfig(
                name=name, subject=address.subject, handler=dispatch, queue_group=self.service
            )
        )
        # The server must know the subscription before anyone may count on it answering.
        await flush_in_order(self.nc)

    async def micro_service(self) -> Service:
        """This process as a NATS micro service (created once): ``$SRV.PING|INFO|STATS``."""
        async with self._micro_lock:
            if self._micro is None:
                self._micro = await add_service(
                    self.nc,
                    ServiceConfig(
                        name=self.service,
                        version=self.version,
                        description=f"Rucher {self.service} on {self.node}",
                        metadata={"node": self.node},
                        queue_group=self.service,
                    ),
                )
            return self._micro

    # Lifecycle ----------------------------------------------------------------------------

    async def close(self, *, grace: float = 10.0) -> None:
        """Stop serving, let in-flight handlers finish (up to ``grace`` s), then drain."""
        if self._micro is not None:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(grace):
                    await self._micro.stop()
        if self._handler_tasks:
            await asyncio.wait(self._handler_tasks, timeout=grace)
        if self.nc.is_closed:
            return
        if self.nc.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
                async with asyncio.timeout(grace):
                    await self.nc.drain()
            if self.nc.is_closed:
                return
        # Not connected (draining would wait for a reconnect that may never come), or the
        # drain failed: close, whatever state the socket is in.
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.nc.close()


# While a NATS node fails over, a stream has no leader for a few seconds (4-10 s measured here
# after a SIGKILL of the leader's node): callers ride that out this long before they see an error.
FAILOVER_PATIENCE = 20.0
DIRECT_READ_TIMEOUT = 1.0
# Nobody stored the message: sending it again cannot store it twice.
_NOT_STORED = (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError)
# The outcome is unknown: only a message with a de-duplication id may be sent again.
_UNKNOWN = (nats.errors.TimeoutError, TimeoutError)
_UNAVAILABLE = 503


async def store(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
    *,
    deduplicated: bool,
    patience: float = FAILOVER_PATIENCE,
) -> PubAck:
    """Publish to a stream, riding out a leader election; other API errors propagate."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await js.publish(subject, payload, headers=headers or None)
        except _NOT_STORED as err:
            failure: Exception = err
        except _UNKNOWN as err:
            if not deduplicated:
                raise RucherError(
                    ErrorCode.UNAVAILABLE, f"no acknowledgement from the stream for {subject}"
                ) from err
            failure = err
        except nats.js.errors.APIError as err:
            if err.code != _UNAVAILABLE:
                raise
            failure = err
        if time.monotonic() > deadline:
            raise RucherError(
                ErrorCode.UNAVAILABLE, f"no stream stored {subject} within {patience} s"
            ) from failure
        await asyncio.sleep(0.1)


async def read_stream(
    js: JetStreamContext, stream: str, *, subject: str, seq: int | None = None, next_: bool = False
) -> RawStreamMsg | None:
    """Direct-get a message (the last on ``subject``, or the next from ``seq``); None if none.

    Reads are always safe to repeat, so they ride out a fail-over like :func:`store`.
    """
    deadline = time.monotonic() + FAILOVER_PATIENCE
    while True:
        try:
            return await js.get_msg(stream, seq=seq, subject=subject, direct=True, next=next_)
        except nats.js.errors.NotFoundError:
            return None
        except (*_NOT_STORED, *_UNKNOWN, nats.js.errors.ServiceUnavailableError) as err:
            if time.monotonic() > deadline:
                raise RucherError(ErrorCode.UNAVAILABLE, f"stream {stream} did not answer") from err
        await asyncio.sleep(0.1)


async def flush_in_order(nc: Client) -> None:
    """Return once the server has everything this connection sent so far, in order.

    ``Client.flush()`` alone does not promise that: nats-py 2.16 writes its PING straight to the
    socket, ahead of commands still in its buffer, so a subscription made just before could
    reach the server after the PONG (seen: a peer's first message published in that gap was
    lost). The buffer is written out first, then the PING makes the round trip.

    The flusher task is handed a future of this call's own rather than going through
    ``_flush_pending(force_flush=True)``, which swallows a cancellation: a console pump cancelled
    there went on reading, and its task never ended.
    """
    flusher, queue = nc._flusher_task, nc._flush_queue
    if nc.is_connected and flusher is not None and not flusher.done() and queue is not None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await queue.put(written)  # the flusher writes its buffer out, then resolves it
        await written
    await nc.flush()


def new_id() -> str:
    """A fresh command or event id."""
    return uuid.uuid4().hex
