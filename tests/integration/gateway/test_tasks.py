"""Tasks through the gateway: lists and filters, status, log paging, and stopping a task.

A real task runner, registered as a worker like any service, runs the tasks; the gateway reads
their records and logs from the store.
"""

from __future__ import annotations

import asyncio

import pytest

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.registry import ServiceRegistry, describe_self, instance_key
from rucher.tasks import TaskContext, TaskRunner

from ..buses import connected, until
from .stack import ADMIN, NODE, grant, logged_in, make_user

pytestmark = pytest.mark.integration

PASSWORD = "task-pass-1"


@pytest.fixture
async def runner(stack):
    async with connected(stack.nats_url, node=NODE, service="taskworker") as bus:
        me = describe_self(bus)
        lease = await ServiceRegistry(bus).register(me, ttl=10)
        tasks = TaskRunner(bus, worker=instance_key(me))
        await tasks.start()
        yield tasks
        await tasks.close(1.0)
        await lease.release()


async def _lines(task: TaskContext, count: int) -> None:
    for n in range(count):
        await task.log(f"line {n}")


async def _fails(task: TaskContext) -> None:
    await task.log("trying")
    raise RucherError(ErrorCode.CONFLICT, "VM 100 already running")


async def _status(api, upid: str) -> dict:
    reply = await api.get(f"/nodes/{NODE}/tasks/{upid}/status")
    assert reply.status == 200, reply
    return reply.data


async def _stopped(api, upid: str) -> bool:
    return (await _status(api, upid))["status"] == "stopped"


async def test_status_log_and_lists_of_finished_tasks(stack, admin, runner):
    userid = await make_user(admin, password=PASSWORD)
    ok = await runner.submit(
        task_type="qmstart", task_id="100", user=userid, body=lambda t: _lines(t, 120)
    )
    failed = await runner.submit(task_type="qmstop", task_id="101", user=userid, body=_fails)
    mine = await runner.submit(
        task_type="vzdump", task_id="102", user=ADMIN, body=lambda t: _lines(t, 1)
    )
    user = await logged_in(stack, userid, PASSWORD)
    for upid in (ok, failed):
        await until(lambda upid=upid: _stopped(user, upid), timeout=15)
    await until(lambda: _stopped(admin, mine), timeout=15)

    status = await _status(user, ok)
    assert (status["exitstatus"], status["type"], status["id"], status["user"]) == (
        "OK",
        "qmstart",
        "100",
        userid,
    )
    assert status["upid"] == ok and status["node"] == NODE
    assert (await _status(user, failed))["exitstatus"] == "VM 100 already running"

    log = await user.get(f"/nodes/{NODE}/tasks/{ok}/log")
    assert [line["n"] for line in log.data] == list(range(1, 51))  # Proxmox's default limit
    page = await user.get(f"/nodes/{NODE}/tasks/{ok}/log", start=100, limit=50)
    assert [line["t"] for line in page.data] == [f"line {n}" for n in range(100, 120)]

    async def listed(**filters) -> list[str]:
        reply = await user.get(f"/nodes/{NODE}/tasks", **filters)
        assert reply.status == 200, reply
        return [task["upid"] for task in reply.data]

    await until(lambda: _listed_contains(user, ok, failed), timeout=10)
    assert await listed() == [failed, ok]  # newest first
    assert mine not in await listed()  # another user's task, and no Sys.Audit
    assert await listed(typefilter="qmstop") == [failed]
    assert await listed(vmid=100) == [ok]
    assert await listed(errors=1) == [failed]
    assert await listed(statusfilter="ok") == [ok]
    assert await listed(source="active") == []
    assert len(await listed(limit=1)) == 1
    cluster = [task["upid"] for task in (await user.get("/cluster/tasks")).data]
    assert cluster == [failed, ok]  # only the caller's own, without Sys.Audit on /

    # Another user's task: refused to read, until Sys.Audit on the node.
    assert (await user.get(f"/nodes/{NODE}/tasks/{mine}/status")).status == 403
    assert (await user.get(f"/nodes/{NODE}/tasks/{mine}/log")).status == 403
    await grant(admin, f"/nodes/{NODE}", ["Sys.Audit"], users=userid)
    assert (await user.get(f"/nodes/{NODE}/tasks/{mine}/status")).status == 200
    assert mine in await listed(source="all")
    await user.close()


async def _listed_contains(api, *upids: str) -> bool:
    reply = await api.get(f"/nodes/{NODE}/tasks")
    return {task["upid"] for task in reply.data} >= set(upids)


async def test_stopping_a_running_task(stack, admin, runner):
    started = asyncio.Event()

    async def forever(task: TaskContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    upid = await runner.submit(task_type="vncproxy", task_id="100", user=ADMIN, body=forever)
    await started.wait()
    assert (await _status(admin, upid))["status"] == "running"
    assert upid in [
        t["upid"] for t in (await admin.get(f"/nodes/{NODE}/tasks", source="active")).data
    ]

    other = await make_user(admin, password=PASSWORD)
    stranger = await logged_in(stack, other, PASSWORD)
    assert (await stranger.delete(f"/nodes/{NODE}/tasks/{upid}")).status == 403
    assert (await _status(admin, upid))["status"] == "running"

    assert (await admin.delete(f"/nodes/{NODE}/tasks/{upid}")).status == 200
    await until(lambda: _stopped(admin, upid), timeout=15)
    assert (await _status(admin, upid))["exitstatus"] == "interrupted by signal"
    await stranger.close()


async def test_unknown_and_malformed_upids(admin):
    bad = await admin.get(f"/nodes/{NODE}/tasks/UPID:nope/status")
    assert bad.status == 400 and set(bad.errors) == {"upid"}
    unknown = f"UPID:{NODE}:00000001:00000001:00000001:qmstart:100:root@pam:"
    assert (await admin.get(f"/nodes/{NODE}/tasks/{unknown}/status")).status == 404
    elsewhere = unknown.replace(f":{NODE}:", ":n9:")
    assert (await admin.get(f"/nodes/{NODE}/tasks/{elsewhere}/status")).status == 404
