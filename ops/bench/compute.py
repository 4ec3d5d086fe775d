"""Compute benchmark: VM start through the API vs libvirt directly, and concurrent creates.

Run: .venv/bin/python ops/bench/compute.py [--starts N] [--creates C]

Starts its own nats-server, IAM, gateway, storage service (``local`` in a temporary folder), a
libvirtd of its own (``rucher.testing.libvirt.NodeDaemon``: a private mount namespace, so no
other agent on this machine touches its domains; root) and the compute agent on it, and boots
the test guest of ``ops/build-guest`` (QEMU under TCG when KVM does not work). Then:

- start overhead: one created, stopped VM (64 MiB, a 1 GiB qcow2 disk on ``local``, the test
  kernel booted directly). N rounds alternate two ways of starting it, each timed from the call
  until libvirt (polled every millisecond on a connection of the bench's own) reports the
  domain running: ``POST .../status/start`` at the gateway with an API token, and
  ``virDomainCreate`` of the same defined domain called directly. The domain is destroyed
  directly between rounds. ``api_overhead_p50_ms`` is the median of the paired differences
  (API start i minus direct start i, taken back to back), target <= 50 ms; QEMU's own start
  under TCG varies by seconds on a loaded machine, which pairing cancels where the difference
  of the two medians (printed too) does not.
- creates: C ``POST /nodes/{node}/qemu`` at once (each with a new 1 GiB qcow2 disk), each polled
  until its task is ``OK``; ``creates_per_s`` = C / (last OK - first call). Everything is
  destroyed afterwards.

Last line: RESULT api_overhead_p50_ms=<x> creates_per_s=<y>
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from rucher.testing.libvirt import NodeDaemon
from rucher.testing.nats import NatsServer, free_port
from rucher.testing.process import ManagedProcess

ROOT = Path(__file__).resolve().parents[2]
NODE = "bench"
ADMIN = "admin@pve"
ADMIN_PASSWORD = "bench-admin-pass"
FIRST_VMID = 880_000
OVERHEAD_TARGET_MS = 50.0


def service(name: str, root: Path, nats_url: str, **env: str) -> ManagedProcess:
    """One Rucher service process of the benchmark's stack."""
    base = {
        "RUCHER_NATS_URL": nats_url,
        "RUCHER_NODE": NODE,
        "RUCHER_STATE_DIR": str(root / name),
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_LOG_LEVEL": "info",
    }
    for variable in list(os.environ):
        if variable.startswith("RUCHER_") and variable not in base and variable not in env:
            base[variable] = ""
    return ManagedProcess(
        name, [sys.executable, "-m", f"rucher.{name}"], root / f"{name}.log", {**base, **env}
    )


def guest_files() -> tuple[Path, Path]:
    """The test guest's kernel and initramfs (built once by ops/build-guest)."""
    out = (
        subprocess.run(
            [str(ROOT / "ops" / "build-guest"), "--print-dir"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return Path(out) / "vmlinux", Path(out) / "initramfs.cpio"


class Api:
    """The gateway over HTTPS with an administrator's API token."""

    def __init__(self, base: str, header: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=base, verify=False, timeout=120, headers={"Authorization": header},
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )  # fmt: skip

    async def call(self, method: str, path: str, **params: Any) -> Any:
        """One request; fails the benchmark on anything but 200."""
        if method in {"GET", "DELETE"}:
            response = await self.client.request(method, path, params=params)
        else:
            response = await self.client.request(method, path, data=params)
        if response.status_code != 200:
            raise SystemExit(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()["data"]

    async def task_ok(self, upid: str, poll: float = 0.02) -> None:
        """Wait until the task stops; it must end OK."""
        while True:
            status = await self.call("GET", f"/nodes/{NODE}/tasks/{upid}/status")
            if status["status"] == "stopped":
                if status["exitstatus"] != "OK":
                    raise SystemExit(f"task {upid}: {status['exitstatus']}")
                return
            await asyncio.sleep(poll)


def admin_token(base: str) -> str:
    """An API token of the administrator (no privilege separation)."""
    with httpx.Client(base_url=base, verify=False, timeout=30) as admin:
        login = admin.post("/access/ticket", data={"username": ADMIN, "password": ADMIN_PASSWORD})
        data = login.json()["data"]
        admin.cookies.set("PVEAuthCookie", data["ticket"])
        admin.headers["CSRFPreventionToken"] = data["CSRFPreventionToken"]
        token = admin.post(f"/access/users/{ADMIN}/token/bench", data={"privsep": "0"})
        value = token.json()["data"]
    return f"PVEAPIToken={value['full-tokenid']}={value['value']}"


def wait_http(url: str, processes: list[ManagedProcess], timeout: float = 60.0) -> None:
    """Until ``url`` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if not process.alive:
                raise SystemExit(f"{process.name} exited:\n{process.tail_log(30)}")
        try:
            if httpx.get(url, verify=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


async def wait_agents(api: Api, processes: list[ManagedProcess]) -> None:
    """Until the agent and the storage service say they started (they serve from then on)."""
    deadline = time.monotonic() + 90
    for process in processes:
        while '"service_started"' not in process.log_file.read_text(errors="replace"):
            if not process.alive or time.monotonic() > deadline:
                raise SystemExit(f"{process.name} did not start:\n{process.tail_log(30)}")
            await asyncio.sleep(0.1)


def running(domain: Any, libvirt: Any) -> bool:
    """Whether libvirt reports the domain running."""
    return bool(domain.state()[0] == libvirt.VIR_DOMAIN_RUNNING)


async def until_running(domain: Any, libvirt: Any) -> None:
    """Poll libvirt every millisecond until the domain runs."""
    deadline = time.monotonic() + 60
    while not running(domain, libvirt):
        if time.monotonic() > deadline:
            raise SystemExit("the domain did not start within 60 s")
        await asyncio.sleep(0.001)


async def stop_directly(domain: Any, libvirt: Any) -> None:
    """Destroy the domain and wait until libvirt reports it stopped."""
    if running(domain, libvirt):
        domain.destroy()
    while domain.isActive():  # noqa: ASYNC110 - libvirt's state, polled
        await asyncio.sleep(0.005)


def vm_params(vmid: int, kernel: Path, initrd: Path) -> dict[str, Any]:
    """A small VM booting the test guest, with a new 1 GiB qcow2 disk on ``local``."""
    return {
        "vmid": vmid,
        "memory": 64,
        "serial0": "socket",
        "vga": "serial0",
        "scsi0": "local:1,format=qcow2",
        "args": f"-kernel {kernel} -initrd {initrd} -append 'console=ttyS0 quiet panic=-1'",
    }


async def start_overhead(
    api: Api, uri: str, starts: int, kernel: Path, initrd: Path
) -> tuple[list, list]:
    """N API starts and N direct starts of the same VM, alternating; milliseconds each."""
    import libvirt

    vmid = FIRST_VMID
    await api.task_ok(
        await api.call("POST", f"/nodes/{NODE}/qemu", **vm_params(vmid, kernel, initrd))
    )
    connection = libvirt.open(uri)
    domain = connection.lookupByName(f"rucher-{vmid}")
    via_api: list[float] = []
    direct: list[float] = []
    answered: list[float] = []
    try:
        for _ in range(starts):
            started = time.perf_counter()
            upid = await api.call("POST", f"/nodes/{NODE}/qemu/{vmid}/status/start")
            answered.append((time.perf_counter() - started) * 1000)
            await until_running(domain, libvirt)
            via_api.append((time.perf_counter() - started) * 1000)
            await api.task_ok(upid)
            await stop_directly(domain, libvirt)
            started = time.perf_counter()
            await asyncio.to_thread(domain.create)
            await until_running(domain, libvirt)
            direct.append((time.perf_counter() - started) * 1000)
            await stop_directly(domain, libvirt)
    finally:
        await stop_directly(domain, libvirt)
        connection.close()
        await api.task_ok(await api.call("DELETE", f"/nodes/{NODE}/qemu/{vmid}", purge=1))
    print(f"the start request itself (until its UPID came back): p50 "
          f"{statistics.median(answered):.1f} ms")  # fmt: skip
    return via_api, direct


async def creates(api: Api, count: int, kernel: Path, initrd: Path) -> float:
    """Creates per second with ``count`` concurrent creates (API call to task OK)."""
    vmids = [FIRST_VMID + 1 + index for index in range(count)]

    async def one(vmid: int) -> float:
        upid = await api.call("POST", f"/nodes/{NODE}/qemu", **vm_params(vmid, kernel, initrd))
        await api.task_ok(upid, poll=0.05)
        return time.perf_counter()

    started = time.perf_counter()
    try:
        finished = await asyncio.gather(*(one(vmid) for vmid in vmids))
    finally:
        existing = [
            entry["vmid"] for entry in await api.call("GET", f"/nodes/{NODE}/qemu")
            if entry["vmid"] in set(vmids)
        ]  # fmt: skip

        async def delete(vmid: int) -> None:
            await api.task_ok(await api.call("DELETE", f"/nodes/{NODE}/qemu/{vmid}", purge=1))

        await asyncio.gather(*(delete(vmid) for vmid in existing))
    return count / (max(finished) - started)


async def bench(args: argparse.Namespace, root: Path) -> tuple[list[float], list[float], float]:
    """Start the stack, run both measurements, stop the stack."""
    kernel, initrd = await asyncio.to_thread(guest_files)
    daemon = NodeDaemon(root=root / "libvirt", address="127.0.0.1", host_uuid=str(uuid.uuid4()))
    await asyncio.to_thread(daemon.prepare)
    libvirtd = ManagedProcess("libvirtd", daemon.argv(), root / "libvirtd.log", {})
    nats = NatsServer(name="bench", store_dir=root / "nats")
    nats.start()
    port = free_port()
    processes = [
        libvirtd,
        service("iam", root, nats.url, RUCHER_ADMIN_PASSWORD=ADMIN_PASSWORD),
        service("gateway", root, nats.url, RUCHER_GATEWAY_LISTEN=f"127.0.0.1:{port}"),
        service("storage", root, nats.url, RUCHER_STORAGE_LOCAL_PATH=str(root / "local")),
        service(
            "compute",
            root,
            nats.url,
            RUCHER_LIBVIRT_URI=daemon.uri,
            RUCHER_LIBVIRT_QEMU_PID_DIR=str(daemon.qemu_pid_dir),
        ),
    ]
    try:
        libvirtd.start()
        deadline = time.monotonic() + 30
        while not daemon.answers():
            if not libvirtd.alive or time.monotonic() > deadline:
                raise SystemExit(f"libvirtd did not start:\n{libvirtd.tail_log(30)}")
            await asyncio.sleep(0.1)
        for process in processes[1:]:
            process.start()
        base = f"https://127.0.0.1:{port}/api2/json"
        wait_http(f"{base}/access/domains", processes)
        api = Api(base, admin_token(base))
        try:
            await wait_agents(api, processes[3:])
            via_api, direct = await start_overhead(api, daemon.uri, args.starts, kernel, initrd)
            rate = await creates(api, args.creates, kernel, initrd)
        finally:
            await api.client.aclose()
    finally:
        for process in reversed(processes):
            process.stop()
        nats.stop()
    return via_api, direct, rate


def main() -> None:
    """Parse arguments, run, print the figures and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=30)
    parser.add_argument("--creates", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rucher-bench-compute-") as tmp:
        via_api, direct, rate = asyncio.run(bench(args, Path(tmp)))
    api_p50, direct_p50 = statistics.median(via_api), statistics.median(direct)
    overhead = api_p50 - direct_p50
    print(
        f"start until libvirt reports running, {len(via_api)} each: "
        f"API p50 {api_p50:.1f} ms (min {min(via_api):.1f}, max {max(via_api):.1f}), "
        f"direct virDomainCreate p50 {direct_p50:.1f} ms "
        f"(min {min(direct):.1f}, max {max(direct):.1f})"
    )
    paired = statistics.median(api - plain for api, plain in zip(via_api, direct, strict=True))
    print(f"difference of the medians: {overhead:.1f} ms")
    verdict = "meets" if paired <= OVERHEAD_TARGET_MS else "misses"
    print(
        f"API overhead p50 (paired rounds) {paired:.1f} ms: "
        f"{verdict} the {OVERHEAD_TARGET_MS:.0f} ms target"
    )
    print(f"{args.creates} concurrent creates with a disk each: {rate:.2f} creates/s")
    print(f"RESULT api_overhead_p50_ms={paired:.1f} creates_per_s={rate:.2f}")


if __name__ == "__main__":
    main()
