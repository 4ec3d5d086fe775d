"""Start the real storage service (``python -m rucher.storage``) and talk to it over the bus."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rucher.bus import Bus, RucherError
from rucher.proto.base import RpcSubject
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import STATUS, StorageStatusQuery
from rucher.proto.task import TaskState, TaskStatus
from rucher.tasks import TaskStore

ROOT = Path(__file__).resolve().parents[2]


def start_storage(url: str, state: Path, node: str = "n1", **env: str) -> subprocess.Popen[bytes]:
    """The storage service as a process of its own, logging to ``state/storage-{node}.log``."""
    state.mkdir(parents=True, exist_ok=True)
    environ = {
        **os.environ,
        "RUCHER_NATS_URL": url,
        "RUCHER_NODE": node,
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_REGISTRY_TTL": "3",
        "RUCHER_LOG_FORMAT": "console",
        "RUCHER_LOG_LEVEL": "debug",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.storage"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=(state / f"storage-{node}.log").open("wb"),
        start_new_session=True,
    )


def stop_storage(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def wait_ready(
    url: str, process: subprocess.Popen[bytes], node: str = "n1", timeout: float = 30.0
) -> None:
    """Return once the service answers this node's status requests."""
    bus = await Bus.connect(url, node="probe", service="probe")
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the storage service exited with {process.returncode}")
            try:
                await bus.request(STATUS.to(node=node), StorageStatusQuery(), timeout=2.0)
            except RucherError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
            else:
                return
    finally:
        await bus.close(grace=0.5)


def cid() -> str:
    """A fresh command id."""
    return uuid.uuid4().hex


async def call(bus: Bus, subject: RpcSubject[Any, Any], node: str = "n1", **fields: Any) -> Any:
    """Send one storage request (a command gets a fresh id unless given one)."""
    if "command_id" in subject.payload.__struct_fields__:
        fields.setdefault("command_id", cid())
    address = subject.to(node=node) if "node" in subject.params else subject.address
    return await bus.request(address, subject.payload(**fields), timeout=60.0)


async def refused(
    bus: Bus, subject: RpcSubject[Any, Any], code: ErrorCode, field: str | None, **fields: Any
) -> RucherError:
    """Send a request that must fail with ``code``, naming ``field``."""
    with pytest.raises(RucherError) as caught:
        await call(bus, subject, **fields)
    assert caught.value.code is code, caught.value
    assert caught.value.details.get("field") == field, caught.value.details
    return caught.value


async def finished(bus: Bus, upid: str, timeout: float = 60.0) -> TaskState:
    """Wait for a task to stop and return its record."""
    store = TaskStore(bus)
    deadline = time.monotonic() + timeout
    while True:
        state = await store.get(upid)
        if state.status is TaskStatus.STOPPED:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {upid} still running")
        await asyncio.sleep(0.05)
