"""Rucher services on a 3-node harness: a node killed whole loses its tasks cleanly."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from rucher.proto.task import TaskStatus
from rucher.registry import ServiceRegistry
from rucher.tasks import TaskStore

from .buses import connected, until
from .worker_service import request_sleep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REGISTRY_TTL = 12.0  # above the 4-10 s NATS fail-over measured here


async def _nodes_registered(registry: ServiceRegistry) -> set[str]:
    return {instance.node for instance in await registry.instances(service="testworker")}


async def test_killing_a_node_ends_its_tasks_and_removes_its_services(harness_factory):
    harness = harness_factory(3)
    for node in harness.nodes:
        node.start_service(
            "testworker",
            [sys.executable, "-m", "tests.integration.worker_service"],
            env={"PYTHONPATH": str(ROOT), "RUCHER_REGISTRY_TTL": str(REGISTRY_TTL)},
        )
    n1, _, n3 = harness.nodes
    survivors = [n1.nats.url, n3.nats.url]
    async with connected(survivors, node="observer", service="observer") as bus:
        registry = ServiceRegistry(bus)
        await until(lambda: _registered_everywhere(registry), timeout=60)
        doomed = await request_sleep(bus, "n2", 3600)
        safe = await request_sleep(bus, "n3", 2)
        store = TaskStore(bus)
        assert (await store.get(doomed.upid)).status is TaskStatus.RUNNING

        harness.kill("n2")
        killed = time.monotonic()
        await until(lambda: _stopped(store, doomed.upid), timeout=60, every=0.2)
        ended_after = time.monotonic() - killed

        state = await store.get(doomed.upid)
        assert state.exitstatus.startswith("unexpected status: worker testworker.n2.")
        # Registration TTL, plus a NATS fail-over if n2 led the bucket, plus a reaper take-over.
        assert ended_after < 2 * REGISTRY_TTL + 10
        assert await _nodes_registered(registry) == {"n1", "n3"}
        await until(lambda: _stopped(store, safe.upid), timeout=30)
        assert (await store.get(safe.upid)).exitstatus == "OK"


async def _registered_everywhere(registry: ServiceRegistry) -> bool:
    return await _nodes_registered(registry) == {"n1", "n2", "n3"}


async def _stopped(store: TaskStore, upid: str) -> bool:
    return (await store.get(upid)).status is TaskStatus.STOPPED
