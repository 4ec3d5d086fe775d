"""Start the real IAM service (``python -m rucher.iam``) against a test nats-server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from rucher.bus import Bus, RucherError
from rucher.proto.iam import USER_LIST, UserListQuery

ROOT = Path(__file__).resolve().parents[2]


def start_iam(url: str, state: Path, node: str = "n1", **env: str) -> subprocess.Popen[bytes]:
    """The IAM service as a process of its own, logging to ``state/iam-{node}.log``."""
    state.mkdir(parents=True, exist_ok=True)
    environ = {
        **os.environ,
        "RUCHER_NATS_URL": url,
        "RUCHER_NODE": node,
        "RUCHER_STATE_DIR": str(state),
        "RUCHER_REGISTRY_TTL": "3",
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_LOG_LEVEL": "debug",
        **env,
    }
    if "RUCHER_ADMIN_PASSWORD" not in env:
        environ.pop("RUCHER_ADMIN_PASSWORD", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rucher.iam"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=(state / f"iam-{node}.log").open("wb"),
        start_new_session=True,
    )


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once the service answers requests."""
    bus = await Bus.connect(url, node="probe", service="probe")
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the IAM service exited with {process.returncode}")
            try:
                await bus.request(USER_LIST.address, UserListQuery(), timeout=2.0)
            except RucherError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
            else:
                return
    finally:
        await bus.close(grace=0.5)


def stop_iam(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the service and wait for it to drain."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
