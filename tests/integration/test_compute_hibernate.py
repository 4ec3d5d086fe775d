"""Hibernation on real QEMU: ``suspend --todisk`` writes the guest to a volume, start restores it.

One nats-server, the storage service (``local`` in a temporary folder), the compute agent and the
system libvirtd, each a real process. The test guest boots (direct kernel boot, TCG), is
hibernated into a raw volume of ``local``, and comes back by ``start`` from that state (libvirt
reports it restored, not booted); the volume is freed and the lock cleared.
"""
# ruff: noqa: F811 - pytest fixtures imported from other modules are parameters here

from __future__ import annotations

import pytest

from rucher.guests import GuestRegistry
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.guest import GuestLock
from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .buses import until
from .test_compute_agent import NODE, ask, cleanup_domain, cmd, guest_config, task_end
from .test_compute_storage import bus, local, stack  # noqa: F401 - fixtures

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_hibernated_guest_resumes_where_it_was(
    bus, guest_image: GuestImage, libvirtd, local, tmp_path
):
    vmid = 990_301
    cleanup_domain(libvirtd, vmid)
    config = guest_config(guest_image, name="hibernate", scsi0="local:0.1,format=qcow2")
    try:
        upid = await ask(bus, compute.GUEST_CREATE, cmd(compute.VmCreate, vmid, config=config))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        console = tmp_path / "state" / "console" / f"{vmid}-serial0.log"

        def booted() -> bool:
            return console.exists() and guest_image.banner in console.read_text(errors="replace")

        await until(booted, timeout=120, every=0.2)

        async def status() -> compute.VmStatusReport:
            return await bus.request(
                compute.GUEST_STATUS.to(node=NODE), compute.VmStatusQuery(vmid=vmid)
            )

        upid = await ask(bus, compute.GUEST_SUSPEND, cmd(compute.VmSuspend, vmid, todisk=True))
        ended = await task_end(bus, upid, timeout=120)
        assert ended.exitstatus == "OK", ended
        record = await GuestRegistry(bus).get(vmid)
        assert record.lock is GuestLock.SUSPENDED
        state = record.config["vmstate"]
        name = state.split("/", 1)[1]
        state_file = local / "images" / str(vmid) / name
        assert state_file.stat().st_size > 1 << 20  # QEMU wrote the guest's memory into it
        assert (await status()).status is PowerState.STOPPED

        upid = await ask(bus, compute.GUEST_START, cmd(compute.VmStart, vmid))
        ended = await task_end(bus, upid, timeout=120)
        assert ended.exitstatus == "OK", ended
        assert (await status()).status is PowerState.RUNNING
        record = await GuestRegistry(bus).get(vmid)
        assert record.lock is None and "vmstate" not in record.config
        assert not state_file.exists()
        # It carried on from the saved state: libvirt restored it, QEMU did not boot it.
        connection = libvirt.open(libvirtd)
        try:
            state_now, reason = connection.lookupByName(f"rucher-{vmid}").state()
        finally:
            connection.close()
        assert (state_now, reason) == (
            libvirt.VIR_DOMAIN_RUNNING,
            libvirt.VIR_DOMAIN_RUNNING_RESTORED,
        )

        upid = await ask(bus, compute.GUEST_STOP, cmd(compute.VmStop, vmid))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        upid = await ask(bus, compute.GUEST_DESTROY, cmd(compute.VmDestroy, vmid, purge=True))
        assert (await task_end(bus, upid)).exitstatus == "OK"
        assert not list(local.rglob(f"*{vmid}*.*"))
    finally:
        cleanup_domain(libvirtd, vmid)
