"""Byte-stream sessions over a real nats-server: order, credit, gaps, idle timeout, close."""

from __future__ import annotations

import asyncio

import nats
import pytest

from rucher.bus.bytestream import ByteStream, StreamClosedError
from rucher.bus.codec import encode
from rucher.proto.bus import ByteFrame

pytestmark = pytest.mark.integration


async def _pair(url: str, **options: float) -> tuple[ByteStream, ByteStream, list]:
    agent_nc = await nats.connect(url)
    gateway_nc = await nats.connect(url)
    agent = ByteStream(agent_nc, outgoing="t.s.out", incoming="t.s.in", **options)  # type: ignore[arg-type]
    gateway = ByteStream(gateway_nc, outgoing="t.s.in", incoming="t.s.out", **options)  # type: ignore[arg-type]
    await gateway.open()
    await agent.open()
    return agent, gateway, [agent_nc, gateway_nc]


async def _close(*connections) -> None:
    for connection in connections:
        await connection.close()


async def test_bytes_flow_both_ways_in_order_and_in_bounded_frames(nats_server_module):
    agent, gateway, connections = await _pair(nats_server_module.url)
    try:
        await gateway.ping()
        await agent.wait_first(5)
        payload = bytes(range(256)) * 1024  # 256 KiB: four frames
        await agent.send(payload)
        received = b""
        while len(received) < len(payload):
            chunk = await gateway.receive()
            assert len(chunk) <= 64 * 1024
            received += chunk
        assert received == payload
        await gateway.send(b"echo hi\n")
        assert await agent.receive() == b"echo hi\n"
        await gateway.close("done")
        with pytest.raises(StreamClosedError) as closed:
            await asyncio.wait_for(agent.receive(), 5)
        assert closed.value.reason == "done"
    finally:
        await agent.close("test over")
        await _close(*connections)


async def test_a_sender_waits_for_credit(nats_server_module):
    agent, gateway, connections = await _pair(
        nats_server_module.url, window=64 * 1024, ack_every=32 * 1024
    )
    try:
        await agent.send(b"x" * 64 * 1024)  # fills the window
        blocked = asyncio.create_task(agent.send(b"y" * 1024))
        await asyncio.sleep(0.3)
        assert not blocked.done()
        assert len(await gateway.receive()) == 64 * 1024  # consuming acks: credit comes back
        await asyncio.wait_for(blocked, 5)
        assert await gateway.receive() == b"y" * 1024
    finally:
        await agent.close("test over")
        await gateway.close("test over")
        await _close(*connections)


async def test_a_lost_frame_closes_the_session(nats_server_module):
    agent, gateway, connections = await _pair(nats_server_module.url)
    try:
        await gateway.ping()
        await agent.wait_first(5)
        await connections[1].publish("t.s.in", encode(ByteFrame(seq=5, data=b"late")))
        with pytest.raises(StreamClosedError) as closed:
            await asyncio.wait_for(agent.receive(), 5)
        assert "lost" in closed.value.reason
    finally:
        await agent.close("test over")
        await gateway.close("test over")
        await _close(*connections)


async def test_a_silent_peer_is_dropped_and_a_late_client_is_refused(nats_server_module):
    nc = await nats.connect(nats_server_module.url)
    lonely = ByteStream(nc, outgoing="t.q.out", incoming="t.q.in", heartbeat=0.2, idle=0.6)
    await lonely.open()
    try:
        with pytest.raises(StreamClosedError):
            await lonely.wait_first(0.3)
        with pytest.raises(StreamClosedError):
            await lonely.send(b"anyone?")
        idle = ByteStream(nc, outgoing="t.r.out", incoming="t.r.in", heartbeat=0.2, idle=0.6)
        await idle.open()
        with pytest.raises(StreamClosedError) as closed:
            await asyncio.wait_for(idle.receive(), 5)
        assert "no frame" in closed.value.reason
    finally:
        await nc.close()
