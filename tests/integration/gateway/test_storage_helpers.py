"""Helpers for the gateway's storage tests: the storage service beside the stack, volumes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from rucher.testing.process import ManagedProcess

from .stack import NODE, Api, Stack, service_env


def start_storage(stack: Stack, local: Path, **env: str) -> ManagedProcess:
    """The storage service on the stack's node, ``local`` on ``local`` (wait: wait_storage)."""
    service = ManagedProcess(
        "storage",
        [sys.executable, "-m", "rucher.storage"],
        stack.root / "storage.log",
        service_env(
            stack.nats_url,
            stack.root / "storage",
            RUCHER_STORAGE_LOCAL_PATH=str(local),
            RUCHER_STORAGE_STATUS_INTERVAL="1",
            RUCHER_STORAGE_TRANSFER_TIMEOUT="5",
            **env,
        ),
    )
    stack.processes.append(service)
    service.start()
    return service


async def wait_storage(admin: Api, timeout: float = 60.0) -> None:
    """Return once the node's storage service answers through the gateway."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await admin.get(f"/nodes/{NODE}/storage/local/status")
        if reply.status == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the storage service did not answer: {reply}")
        await asyncio.sleep(0.2)


async def make_volume(admin: Api, vmid: int, name: str, storage: str = "local") -> str:
    """A 1 MiB qcow2 volume of ``vmid``, allocated through the API; returns its volume id."""
    reply = await admin.post(
        f"/nodes/{NODE}/storage/{storage}/content",
        vmid=vmid,
        filename=f"vm-{vmid}-{name}.qcow2",
        size="1M",
    )
    assert reply.status == 200, reply
    return str(reply.data)
