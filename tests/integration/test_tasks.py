"""Tasks against real NATS: UPIDs, logs, stop, idempotent submission, and dead workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskStatus
from rucher.registry import ServiceRegistry, describe_self, instance_key
from rucher.tasks import INTERRUPTED, TaskContext, TaskReaper, TaskRunner, TaskStore, Upid

from .buses import connected, until
from .worker_service import request_sleep

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def _runner(bus) -> TaskRunner:
    me = describe_self(bus)
    await ServiceRegistry(bus).register(me, ttl=5)
    runner = TaskRunner(bus, worker=instance_key(me))
    await runner.start()
    return runner


async def _stopped(store: TaskStore, upid: str):
    await until(lambda: _is_stopped(store, upid))
    return await store.get(upid)


async def _is_stopped(store: TaskStore, upid: str) -> bool:
    return (await store.get(upid)).status is TaskStatus.STOPPED


async def test_a_task_runs_logs_and_ends_ok_with_a_proxmox_upid(nats_server):
    async with connected(nats_server.url) as bus:
        runner = await _runner(bus)

        async def body(task: TaskContext) -> None:
            for n in range(5):
                await task.log(f"step {n}")

        upid = await runner.submit(task_type="qmstart", task_id="100", user="root@pam", body=body)
        parsed = Upid.parse(upid)
        assert (parsed.node, parsed.type, parsed.id, parsed.user) == (
            "n1",
            "qmstart",
            "100",
            "root@pam",
        )
        assert str(parsed) == upid and upid.count(":") == 8 and upid.endswith(":")
        state = await _stopped(runner.store, upid)
        assert state.exitstatus == "OK" and state.endtime
        lines = await runner.store.read_log(upid)
        assert [(line.n, line.t) for line in lines] == [(n + 1, f"step {n}") for n in range(5)]
        assert [line.t for line in await runner.store.read_log(upid, start=3, limit=10)] == [
            "step 3",
            "step 4",
        ]
        await runner.close()


async def test_failures_end_with_a_readable_exit_status(nats_server):
    async with connected(nats_server.url) as bus:
        runner = await _runner(bus)

        async def refused(task: TaskContext) -> None:
            raise RucherError(ErrorCode.CONFLICT, "VM 100 already running")

        async def crashed(task: TaskContext) -> None:
            raise ZeroDivisionError

        first = await runner.submit(task_type="qmstart", task_id="100", user="a@pve", body=refused)
        second = await runner.submit(task_type="qmstart", task_id="101", user="a@pve", body=crashed)
        assert (await _stopped(runner.store, first)).exitstatus == "VM 100 already running"
        state = await _stopped(runner.store, second)
        assert state.exitstatus.startswith("internal error")
        assert state.error is not None and state.error.code is ErrorCode.INTERNAL
        await runner.close()


async def test_stopping_a_task_through_its_record_interrupts_it(nats_server):
    async with connected(nats_server.url) as bus, connected(nats_server.url) as gateway:
        runner = await _runner(bus)
        started = asyncio.Event()

        async def forever(task: TaskContext) -> None:
            started.set()
            await asyncio.sleep(3600)

        upid = await runner.submit(task_type="vzdump", task_id="100", user="a@pve", body=forever)
        await started.wait()
        # The stop request comes from another process (the gateway), through the task record.
        await TaskStore(gateway).request_cancel(upid, "root@pam")
        state = await _stopped(runner.store, upid)
        assert state.exitstatus == INTERRUPTED
        assert state.cancel_requested_by == "root@pam"
        await runner.close()


async def test_the_same_command_submitted_twice_runs_once(nats_server):
    async with connected(nats_server.url) as bus:
        runner = await _runner(bus)
        runs = 0

        async def body(task: TaskContext) -> None:
            nonlocal runs
            runs += 1

        command = new_id()
        upids = await asyncio.gather(
            *(
                runner.submit(
                    task_type="qmcreate", task_id="1", user="a@pve", body=body, command_id=command
                )
                for _ in range(5)
            )
        )
        assert len(set(upids)) == 1
        await _stopped(runner.store, upids[0])
        await asyncio.sleep(0.1)
        assert runs == 1
        await runner.close()


async def test_upids_are_unique_at_hundreds_per_second(nats_server):
    async with connected(nats_server.url) as bus:
        runner = await _runner(bus)

        async def body(task: TaskContext) -> None:
            return None

        upids = await asyncio.gather(
            *(
                runner.submit(task_type="qmstart", task_id=str(n), user="a@pve", body=body)
                for n in range(300)
            )
        )
        assert len(set(upids)) == 300
        assert len({Upid.parse(u).starttime for u in upids}) <= 3  # many in the same second
        await runner.close()


async def test_bad_task_identifiers_are_refused(nats_server):
    async with connected(nats_server.url) as bus:
        runner = await _runner(bus)

        async def body(task: TaskContext) -> None:
            return None

        with pytest.raises(RucherError) as bad:
            await runner.submit(task_type="qm:start", task_id="1", user="a@pve", body=body)
        assert bad.value.code is ErrorCode.INVALID
        with pytest.raises(RucherError) as unknown:
            await runner.store.get("UPID:n1:00000001:00000001:00000001:x:1:a@pve:")
        assert unknown.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(RucherError) as garbage:
            await runner.store.get("not-a-upid")
        assert garbage.value.code is ErrorCode.INVALID
        await runner.close()


def _start_worker(url: str, state: Path, grace: float = 10) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RUCHER_NATS_URL": url,
        "RUCHER_NODE": "w1",
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_REGISTRY_TTL": "2",
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_SHUTDOWN_GRACE": str(grace),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.worker_service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(state / "worker.log").open("wb"),
        start_new_session=True,
    )


@pytest.mark.slow
async def test_a_task_whose_worker_process_is_killed_still_ends(nats_server, tmp_path):
    worker = _start_worker(nats_server.url, tmp_path)
    try:
        async with connected(nats_server.url, node="n1", service="reaper") as bus:
            reply = await request_sleep(bus, "w1", 3600)
            store = TaskStore(bus)
            assert (await store.get(reply.upid)).status is TaskStatus.RUNNING
            reaper = TaskReaper(bus, candidate="test-reaper", interval=1.0, ttl=2.0)
            reaper.start()

            os.killpg(worker.pid, signal.SIGKILL)
            killed = time.monotonic()
            state = await _stopped(store, reply.upid)
            ended_after = time.monotonic() - killed
            assert state.exitstatus.startswith("unexpected status: worker testworker.w1.")
            # The killed worker was also the elected reaper: its election and its registration
            # (both TTL 2 s) expire, the test's reaper takes over and sweeps at once.
            assert ended_after < 2 + 1.0 + 1.0
            assert [line.t for line in await store.read_log(reply.upid)] == ["sleeping 3600.0 s"]
            await reaper.stop()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.mark.slow
async def test_a_service_drains_and_deregisters_on_sigterm(nats_server, tmp_path):
    worker = _start_worker(nats_server.url, tmp_path)
    try:
        async with connected(nats_server.url, service="observer") as bus:
            registry = ServiceRegistry(bus)
            reply = await request_sleep(bus, "w1", 0.5)
            assert await _has_instance(registry, "testworker")
            # Discoverable as a NATS micro service, with its node and endpoint.
            info = json.loads((await bus.nc.request("$SRV.INFO.testworker", b"", timeout=2)).data)
            assert info["metadata"] == {"node": "w1"}
            assert [e["subject"] for e in info["endpoints"]] == ["rpc.testworker.start_sleep.w1"]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=15) == 0
            # The running task was let finish, and the registration was released at once.
            assert (await TaskStore(bus).get(reply.upid)).exitstatus == "OK"
            assert not await _has_instance(registry, "testworker")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


async def _has_instance(registry: ServiceRegistry, service: str) -> bool:
    return bool(await registry.instances(service=service))


@pytest.mark.slow
async def test_a_service_whose_nats_died_still_stops_on_sigterm(nats_server, tmp_path):
    worker = _start_worker(nats_server.url, tmp_path, grace=2)
    try:
        async with connected(nats_server.url, service="observer") as bus:
            await request_sleep(bus, "w1", 3600)  # a task that will have to be interrupted
        nats_server.kill()
        await asyncio.sleep(0.5)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        # Bounded: the task's grace, one more grace for its end, short best-effort steps.
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - started < 2 + 2 + 3 + 3 + 5
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
