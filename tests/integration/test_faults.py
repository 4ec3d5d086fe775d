"""Killing one of three NATS nodes loses no acknowledged event, task state or KV write."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from nats.js import api

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.guests import GuestRegistry
from rucher.proto.guest import GUEST_REGISTERED, GuestRegistered, GuestType
from rucher.proto.streams import EVENTS
from rucher.proto.task import TaskStatus
from rucher.registry import ServiceRegistry, describe_self, instance_key
from rucher.tasks import TaskContext, TaskRunner

from .buses import connected

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _retrying(operation, deadline: float = 20.0):
    """Retry an operation through a NATS fail-over, as every Rucher caller does."""
    stop = time.monotonic() + deadline
    while True:
        try:
            return await operation()
        except RucherError as err:
            if not err.retryable or time.monotonic() > stop:
                raise
            await asyncio.sleep(0.2)


async def test_killing_the_stream_leader_loses_nothing_acknowledged(nats_cluster):
    async with connected(nats_cluster.urls, node="n1") as bus:
        guests = GuestRegistry(bus)
        me = describe_self(bus)
        await ServiceRegistry(bus).register(me, ttl=15)
        runner = TaskRunner(bus, worker=instance_key(me))
        await runner.start()

        async def body(task: TaskContext) -> None:
            await task.log("done")

        acked: list[str] = []
        upids: list[str] = []
        vmids: list[int] = []

        async def publish(n: int) -> None:
            event = GuestRegistered(
                event_id=new_id(),
                node="n1",
                time=time.time(),
                vmid=n,
                guest_type=GuestType.QEMU,
                owner="n1",
            )
            await _retrying(lambda: bus.publish(GUEST_REGISTERED.to(node="n1"), event))
            acked.append(event.event_id)

        async def write(n: int) -> None:
            record = await _retrying(
                lambda: guests.register(guest_type=GuestType.QEMU, node="n1", config={"n": str(n)})
            )
            vmids.append(record.vmid)
            upid = await _retrying(
                lambda: runner.submit(
                    task_type="qmcreate", task_id=str(record.vmid), user="a@pve", body=body
                )
            )
            upids.append(upid)

        for n in range(200):
            await publish(n)
        for n in range(10):
            await write(n)

        info = await bus.js.stream_info(EVENTS.name)
        leader = info.cluster.leader if info.cluster else None
        victim = next(server for server in nats_cluster.servers if server.name == leader)
        victim.kill()

        for n in range(200, 400):
            await publish(n)
        for n in range(10, 20):
            await write(n)
        await asyncio.sleep(0.5)

        # Every acknowledged event is in the stream, exactly once.
        stored: list[str] = []
        sub = await bus.js.subscribe(
            GUEST_REGISTERED.wildcard(), ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        while True:
            msg = await sub.next_msg(timeout=10)
            stored.append(msgspec.json.decode(msg.data, type=GuestRegistered).event_id)
            if msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
        assert len(acked) == 400
        assert set(acked) <= set(stored)
        assert len(set(stored)) == len(stored)

        # Every KV write and every task state survived, and every task ended.
        assert sorted(r.vmid for r in await guests.list()) == sorted(vmids)
        for upid in upids:
            state = await runner.store.get(upid)
            for _ in range(50):
                if state.status is TaskStatus.STOPPED:
                    break
                await asyncio.sleep(0.1)
                state = await runner.store.get(upid)
            assert state.exitstatus == "OK", upid
        await runner.close()
