"""The bus library against a real nats-server: publish, request/reply, consumers, provisioning."""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import nats
import pytest
from nats.js import api

from rucher.bus import Bus, RucherError
from rucher.bus.client import flush_in_order, new_id
from rucher.bus.consumer import Delivery, consume
from rucher.bus.provision import provision
from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.bus import MESSAGE_REJECTED, MessageRejected
from rucher.proto.errors import ErrorCode
from rucher.proto.streams import COMMANDS, EVENTS, IDEMPOTENCY, STREAMS, StreamDef

from .buses import connected

pytestmark = pytest.mark.integration


class Ping(Command, frozen=True, kw_only=True, tag="testbus.ping"):
    text: str


class Pong(Reply, frozen=True, kw_only=True, tag="testbus.pong"):
    text: str
    node: str


class Noted(Event, frozen=True, kw_only=True, tag="testbus.noted"):
    n: int


class Apply(Command, frozen=True, kw_only=True, tag="testbus.apply"):
    amount: int


PING = RpcSubject("rpc.testbus.ping", Ping, Kind.RPC, Scope.CLUSTER, "ping", reply=Pong)
PING_NODE = RpcSubject(
    "rpc.testbus.ping.{node}", Ping, Kind.RPC, Scope.NODE, "ping one node", reply=Pong
)
NOTED = Subject("evt.testbus.noted.{node}", Noted, Kind.EVENT, Scope.NODE, "noted")
APPLY = Subject("cmd.testbus.apply.{node}", Apply, Kind.COMMAND, Scope.NODE, "apply")


def _event(n: int) -> Noted:
    return Noted(event_id=new_id(), node="n1", time=time.time(), n=n)


async def test_request_reply_typed_and_errors(nats_server):
    async with connected(nats_server.url) as server, connected(nats_server.url) as client:

        async def ping(message: Ping, headers: dict[str, str]) -> Pong:
            if message.text == "bad":
                raise RucherError(ErrorCode.INVALID, "text is bad", details={"field": "text"})
            if message.text == "crash":
                raise KeyError("boom")
            return Pong(text=message.text.upper(), node=server.node)

        await server.serve(PING, ping)
        await server.serve(PING_NODE, ping, node="n1")

        reply = await client.request(PING.address, Ping(command_id=new_id(), text="hi"))
        assert reply == Pong(text="HI", node="n1")
        reply = await client.request(PING_NODE.to(node="n1"), Ping(command_id="x", text="a"))
        assert reply.text == "A"

        with pytest.raises(RucherError) as bad:
            await client.request(PING.address, Ping(command_id=new_id(), text="bad"))
        assert (bad.value.code, bad.value.details) == (ErrorCode.INVALID, {"field": "text"})
        assert not bad.value.retryable

        with pytest.raises(RucherError) as crash:
            await client.request(PING.address, Ping(command_id=new_id(), text="crash"))
        assert crash.value.code is ErrorCode.INTERNAL

        with pytest.raises(RucherError) as nobody:
            await client.request(PING_NODE.to(node="n9"), Ping(command_id="y", text="a"))
        assert nobody.value.code is ErrorCode.UNAVAILABLE and nobody.value.retryable

        # A payload that is not a Ping gets a MALFORMED error reply, not silence.
        raw = await client.nc.request(PING.address.subject, b'{"type":"other"}', timeout=2)
        assert json.loads(raw.data)["code"] == "malformed"

        with pytest.raises(TypeError):
            await client.request(PING.address, Pong(text="x", node="n"))  # type: ignore[arg-type]


async def test_request_timeout_is_a_retryable_error(nats_server):
    async with connected(nats_server.url) as server, connected(nats_server.url) as client:

        async def slow(message: Ping, headers: dict[str, str]) -> Pong:
            await asyncio.sleep(2)
            return Pong(text="late", node="n1")

        await server.serve(PING, slow)
        with pytest.raises(RucherError) as late:
            await client.request(PING.address, Ping(command_id="z", text="a"), timeout=0.2)
        assert late.value.code is ErrorCode.TIMEOUT and late.value.retryable


async def test_rpc_endpoints_are_discoverable_as_nats_micro_services(nats_server):
    async with connected(nats_server.url) as server:

        async def ping(message: Ping, headers: dict[str, str]) -> Pong:
            return Pong(text=message.text, node="n1")

        await server.serve(PING, ping)
        info = json.loads((await server.nc.request("$SRV.INFO.test", b"", timeout=2)).data)
        assert info["name"] == "test"
        assert info["metadata"]["node"] == "n1"
        assert [endpoint["subject"] for endpoint in info["endpoints"]] == ["rpc.testbus.ping"]


async def test_publish_deduplicates_by_event_id_and_checks_types(nats_server):
    async with connected(nats_server.url) as bus:
        event = _event(1)
        first = await bus.publish(NOTED.to(node="n1"), event)
        again = await bus.publish(NOTED.to(node="n1"), event)
        assert first == again
        info = await bus.js.stream_info(EVENTS.name)
        assert info.state.messages == 1
        with pytest.raises(TypeError):
            await bus.publish(NOTED.to(node="n1"), Apply(command_id="c", amount=1))  # type: ignore[arg-type]


async def test_provisioning_is_idempotent_and_capped_to_the_cluster(nats_server):
    async with connected(nats_server.url) as bus:
        assert await provision(bus) == 1
        assert await provision(bus) == 1
        names = {info.config.name for info in await bus.js.streams_info()}
        assert {stream.name for stream in STREAMS} <= names
        assert {"KV_tasks", "KV_guests", "KV_leases", "KV_services", "KV_idempotency"} <= names


async def test_consumer_terminates_malformed_messages_reports_them_and_keeps_going(nats_server):
    async with connected(nats_server.url) as bus:
        seen: list[int] = []

        async def handle(message: Noted, delivery: Delivery) -> None:
            seen.append(message.n)

        consumer = await consume(
            bus,
            stream=EVENTS,
            durable="noted-reader",
            filter_subject=NOTED.wildcard(),
            payload=Noted,
            handler=handle,
        )
        await bus.js.publish("evt.testbus.noted.n1", b"not json", headers={"Nats-Msg-Id": "junk"})
        await bus.js.publish("evt.testbus.noted.n1", b'{"type":"testbus.noted"}')
        await bus.publish(NOTED.to(node="n1"), _event(7))
        async with asyncio.timeout(10):
            while seen != [7] or consumer.rejected < 2:
                await asyncio.sleep(0.02)
        await consumer.stop()

        rejected = await bus.js.subscribe(
            MESSAGE_REJECTED.wildcard(), ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        reasons = []
        for _ in range(2):
            msg = await rejected.next_msg(timeout=5)
            reasons.append(msgspec.json.decode(msg.data, type=MessageRejected))
        await rejected.unsubscribe()
        assert {r.consumer for r in reasons} == {"noted-reader"}
        assert all(r.reason.startswith("malformed:") for r in reasons)
        # Terminated messages are never redelivered.
        info = await bus.js.consumer_info(EVENTS.name, "noted-reader")
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_consumer_retries_transient_failures_and_rejects_permanent_ones(nats_server):
    async with connected(nats_server.url) as bus:
        attempts: dict[int, int] = {}

        async def handle(message: Apply, delivery: Delivery) -> None:
            attempts[message.amount] = delivery.attempt
            if message.amount == 1 and delivery.attempt < 3:
                raise RucherError(ErrorCode.UNAVAILABLE, "backend busy")
            if message.amount == 2:
                raise RucherError(ErrorCode.INVALID, "amount 2 is refused")

        consumer = await consume(
            bus,
            stream=COMMANDS,
            durable="apply-n1",
            filter_subject=APPLY.wildcard(node="n1"),
            payload=Apply,
            handler=handle,
        )
        await bus.publish(APPLY.to(node="n1"), Apply(command_id=new_id(), amount=1))
        await bus.publish(APPLY.to(node="n1"), Apply(command_id=new_id(), amount=2))
        async with asyncio.timeout(15):
            while consumer.handled < 1 or consumer.rejected < 1:
                await asyncio.sleep(0.05)
        await consumer.stop()
        assert attempts == {1: 3, 2: 1}
        # Work-queue retention: acked and terminated commands are gone from the stream.
        assert (await bus.js.stream_info(COMMANDS.name)).state.messages == 0


async def test_same_command_delivered_twice_is_applied_once(nats_server):
    # A stream with a 1 s duplicate window lets the same command id be stored twice, as if it
    # were redelivered after the window: the consumer's own record must still apply it once.
    short = StreamDef(
        name="SHORTCMD",
        subjects=("cmd.testbus.>",),
        retention=COMMANDS.retention,
        max_age=60.0,
        max_bytes=1 << 20,
        duplicate_window=1.0,
        replicas=1,
        writers="test",
        readers="test",
        description="test",
    )
    async with connected(nats_server.url, streams=(short,), buckets=(IDEMPOTENCY,)) as bus:
        applied: list[int] = []

        async def handle(message: Apply, delivery: Delivery) -> None:
            applied.append(message.amount)

        consumer = await consume(
            bus,
            stream=short,
            durable="apply-once",
            filter_subject="cmd.testbus.>",
            payload=Apply,
            handler=handle,
            dedupe=True,
        )
        command = Apply(command_id=new_id(), amount=5)
        await bus.publish(APPLY.to(node="n1"), command)
        await bus.publish(APPLY.to(node="n1"), command)  # inside the window: not even stored
        await asyncio.sleep(1.2)
        await bus.publish(APPLY.to(node="n1"), command)  # stored again, must not apply again
        await bus.publish(APPLY.to(node="n1"), Apply(command_id=new_id(), amount=6))
        async with asyncio.timeout(10):
            while 6 not in applied:
                await asyncio.sleep(0.02)
        await consumer.stop()
        assert applied == [5, 6]


async def test_bus_connects_to_a_cluster_and_reports_its_size(nats_cluster):
    bus = await Bus.connect(nats_cluster.urls, node="n1", service="test")
    try:
        assert bus.cluster_size() == 3
    finally:
        await bus.close()


async def test_flush_in_order_writes_buffered_commands_before_its_ping(nats_server):
    """nats-py's ``flush`` writes its PING straight to the socket, ahead of a subscription still
    in its buffer (a message published right after could then miss it); ``flush_in_order``
    writes the buffer first."""
    nc = await nats.connect(nats_server.url)
    written: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def record(data: bytes) -> None:
        written.append(bytes(data))
        write(data)

    def record_lines(lines: list[bytes]) -> None:
        written.extend(bytes(line) for line in lines)
        writelines(lines)

    transport.write, transport.writelines = record, record_lines  # type: ignore[method-assign]
    try:
        for flush, name in ((nc.flush, "plain"), (lambda: flush_in_order(nc), "in order")):
            written.clear()
            await nc.subscribe(f"t.order.{name.replace(' ', '_')}")
            await flush()
            order = [b"SUB" if data.startswith(b"SUB") else data for data in written]
            sub, ping = order.index(b"SUB"), order.index(b"PING\r\n")
            if name == "plain":
                assert ping < sub, "nats-py changed: its flush now keeps the order"
            else:
                assert sub < ping, order
    finally:
        transport.write, transport.writelines = write, writelines  # type: ignore[method-assign]
        await nc.close()


async def test_flush_in_order_can_be_cancelled(nats_server):
    """A task cancelled while it waits for the buffer to be written is cancelled (nats-py's
    ``_flush_pending`` swallows the cancellation: a console pump cancelled there went on)."""
    nc = await nats.connect(nats_server.url)
    try:
        await nc.subscribe("t.cancel")  # something in the buffer
        flushing = asyncio.create_task(flush_in_order(nc))
        await asyncio.sleep(0)  # it waits for the flusher now
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing
    finally:
        await nc.close()
