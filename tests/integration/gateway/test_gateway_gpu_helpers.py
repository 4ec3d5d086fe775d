"""Helpers for the gateway's GPU tests: the GPU broker beside the stack, on a fake sysfs tree."""

from __future__ import annotations

import asyncio
import sys
import time

from rucher.testing.process import ManagedProcess

from ...unit.gpu_hosts import synthetic_node
from .stack import NODE, Api, Stack, service_env


def start_gpu(stack: Stack) -> ManagedProcess:
    """``python -m rucher.gpu`` on the synthetic host's tree, without NVML (wait: wait_gpu)."""
    host = synthetic_node(stack.root / "gpu-host")
    broker = ManagedProcess(
        "gpu",
        [sys.executable, "-m", "rucher.gpu"],
        stack.root / "gpu.log",
        service_env(
            stack.nats_url,
            stack.root / "gpu",
            RUCHER_GPU_SYSFS_ROOT=str(host.kernel.root),
            RUCHER_GPU_NVML="off",
        ),
    )
    stack.processes.append(broker)
    broker.start()
    return broker


async def wait_gpu(admin: Api, timeout: float = 60.0) -> None:
    """Return once the node's GPU broker answers through the gateway."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await admin.get(f"/nodes/{NODE}/hardware/pci")
        if reply.status == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the GPU broker did not answer: {reply}")
        await asyncio.sleep(0.2)
