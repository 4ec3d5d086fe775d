"""Hibernation (``suspend --todisk``) over the fake hypervisor and storage."""
# ruff: noqa: F811 - the ``world`` fixture imported from test_compute_service is a parameter here

from __future__ import annotations

import pytest

from rucher.bus import RucherError
from rucher.compute.domain_xml import domain_name
from rucher.compute.hibernate import state_size, state_storage
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock

from .test_compute_service import World, command, create, world  # noqa: F401 - fixture


def test_the_state_goes_where_asked_else_beside_the_first_disk():
    config = {"ide2": "local:iso/x.iso,media=cdrom", "scsi0": "fast:100/vm-100-disk-0.raw"}
    assert state_storage(config, "other") == "other"
    assert state_storage(config, None) == "fast"
    assert state_storage({**config, "vmstatestorage": "slow"}, None) == "slow"
    assert state_storage({}, None) == "local"
    assert state_size({"memory": "192"}) == 2 * (192 << 20) + (32 << 20)


async def running(world: World, vmid: int = 100, **config: str) -> None:
    await world.service.create(create(vmid, scsi0="local:1", **config))
    await world.service.start(command(compute.VmStart, vmid))


async def test_a_hibernated_guest_is_stopped_locked_and_resumed_by_start(world):
    await running(world)
    await world.service.suspend(command(compute.VmSuspend, todisk=True))
    assert world.tasks.ended[-1] == ("qmsuspend", "OK")
    record = world.guests.records[100]
    assert record.lock is GuestLock.SUSPENDED
    state = record.config["vmstate"]
    assert state in world.volumes.volumes
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.STOPPED
    status = await world.service.status(compute.VmStatusQuery(vmid=100))
    assert status.status is PowerState.STOPPED and status.lock == "suspended"
    # Locked: only a start (which resumes it) is allowed.
    with pytest.raises(RucherError) as caught:
        await world.service.update_config(
            command(compute.VmConfigUpdate, config={"description": "x"})
        )
    assert caught.value.code is ErrorCode.LOCKED

    world.hypervisor.calls.clear()
    await world.service.start(command(compute.VmStart))
    assert world.tasks.ended[-1] == ("qmstart", "OK")
    assert [call for call, _ in world.hypervisor.calls] == ["restore"]  # no define, no boot
    record = world.guests.records[100]
    assert record.lock is None and "vmstate" not in record.config
    assert state not in world.volumes.volumes
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.RUNNING


async def test_a_failed_save_leaves_the_guest_running_unlocked_and_frees_the_volume(world):
    await running(world)
    before = set(world.volumes.volumes)

    async def refuse(name: str, path: str) -> None:
        raise RucherError(ErrorCode.INTERNAL, "libvirt: no space left on device")

    world.hypervisor.save = refuse  # type: ignore[method-assign]
    await world.service.suspend(command(compute.VmSuspend, todisk=True))
    assert world.tasks.ended[-1] == ("qmsuspend", "libvirt: no space left on device")
    record = world.guests.records[100]
    assert record.lock is None and "vmstate" not in record.config
    assert set(world.volumes.volumes) == before
    assert world.hypervisor.domains_by_name[domain_name(100)].state is PowerState.RUNNING


async def test_hibernation_is_refused_for_a_stopped_or_locked_guest_or_pci_devices(world):
    await world.service.create(create(100))
    with pytest.raises(RucherError, match="not running"):
        await world.service.suspend(command(compute.VmSuspend, todisk=True))
    await world.service.create(create(101, hostpci0="0000:01:00.0"))
    with pytest.raises(RucherError) as caught:
        await world.service.suspend(command(compute.VmSuspend, 101, todisk=True))
    assert caught.value.details == {"field": "todisk"}
    assert world.guests.records[101].lock is None


async def test_destroying_a_hibernated_guest_frees_its_state_volume(world):
    await running(world)
    await world.service.suspend(command(compute.VmSuspend, todisk=True))
    state = world.guests.records[100].config["vmstate"]
    with pytest.raises(RucherError) as caught:
        await world.service.destroy(command(compute.VmDestroy))
    assert caught.value.code is ErrorCode.LOCKED
    await world.service.destroy(command(compute.VmDestroy, skiplock=True))
    assert world.tasks.ended[-1] == ("qmdestroy", "OK")
    assert world.guests.records == {}
    assert state not in world.volumes.volumes
    assert not [volid for volid in world.volumes.volumes if ":100/" in volid]
