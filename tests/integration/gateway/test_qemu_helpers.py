"""Helpers for the gateway's VM tests: a compute agent beside the stack, VMs in given states."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
from typing import Any

from rucher.testing.process import ManagedProcess

from .stack import NODE, Api, Stack, service_env

_vmids = itertools.count(70_000 + (os.getpid() % 1000) * 100)


def next_vmid() -> int:
    """A VMID no other test of this run uses."""
    return next(_vmids)


def start_agent(stack: Stack, uri: str, **env: str) -> ManagedProcess:
    """The compute agent on the stack's node, on libvirt ``uri`` (wait for it: wait_agent)."""
    agent = ManagedProcess(
        "compute",
        [sys.executable, "-m", "rucher.compute"],
        stack.root / "compute.log",
        service_env(stack.nats_url, stack.root / "compute", RUCHER_LIBVIRT_URI=uri, **env),
    )
    stack.processes.append(agent)
    agent.start()
    return agent


async def wait_agent(admin: Api, timeout: float = 60.0) -> None:
    """Return once the agent answers through the gateway (a missing VM is 404, not 503).

    A registered agent may not serve its subjects yet: a create it must refuse (no such
    bridge) is answered 400 by the agent itself only once it does.
    """
    deadline = time.monotonic() + timeout
    while True:
        reply = await admin.get(f"/nodes/{NODE}/qemu/999999998/status/current")
        if reply.status == 404:
            reply = await admin.post(
                f"/nodes/{NODE}/qemu", vmid=999999997, net0="virtio,bridge=nosuchbridge0"
            )
            if reply.status == 400:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the compute agent did not answer: {reply}")
        await asyncio.sleep(0.2)


async def finished(api: Api, upid: str, timeout: float = 90.0) -> dict[str, Any]:
    """The task's status once it has stopped."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await api.get(f"/nodes/{NODE}/tasks/{upid}/status")
        assert reply.status == 200, reply
        if reply.data["status"] == "stopped":
            return dict(reply.data)
        if time.monotonic() > deadline:
            raise AssertionError(f"task {upid} still running: {reply.data}")
        await asyncio.sleep(0.05)


async def make_vm(admin: Api, *, start: bool = False, paused: bool = False, **config: Any) -> int:
    """A VM on the stack's node, created (and started, and paused) through the API."""
    vmid = next_vmid()
    params = {"vmid": vmid, "memory": 64, **config}
    reply = await admin.post(f"/nodes/{NODE}/qemu", start=int(start or paused), **params)
    assert reply.status == 200, reply
    assert (await finished(admin, reply.data))["exitstatus"] == "OK"
    if paused:
        reply = await admin.post(f"/nodes/{NODE}/qemu/{vmid}/status/suspend")
        assert reply.status == 200, reply
        assert (await finished(admin, reply.data))["exitstatus"] == "OK"
    return vmid
