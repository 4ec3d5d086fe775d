"""The compute agent's composition root: settings, libvirt driver, service, reconcile, serve."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.compute.claims import BusClaims
from rucher.compute.config import ComputeSettings
from rucher.compute.disks import CloneOptions
from rucher.compute.domain_xml import HostFacts
from rucher.compute.drivers.libvirt import kvm_usable
from rucher.compute.drivers.libvirt_cloudinit import CloudInitHypervisor
from rucher.compute.fencing import LeaseFence
from rucher.compute.gpu import BusBroker
from rucher.compute.handlers import serve
from rucher.compute.migrate_wiring import serve_migration
from rucher.compute.pools import BusPools
from rucher.compute.probes import BusProbes
from rucher.compute.reconcile import reconcile
from rucher.compute.service import ComputeService
from rucher.compute.wiring import serve_console_and_rrd
from rucher.guests import GuestRegistry
from rucher.proto import storage as s
from rucher.proto.base import Subject
from rucher.proto.storage import (
    VOLUME_ALLOCATE,
    VOLUME_FREE,
    VOLUME_MAP,
    DiskFormat,
    VolumeAllocate,
    VolumeFree,
    VolumeInfo,
    VolumeMap,
    VolumeMapping,
)
from rucher.service import ServiceContext, main

log = structlog.get_logger("rucher.compute")

# Allocating a large raw or preallocated disk can take a while on a slow filesystem.
STORAGE_TIMEOUT = 120.0


class BusEvents:
    """Publishes this node's events; a lost one is logged (documents and tasks are the truth)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def emit(self, subject: Subject[Any], event: Any) -> None:
        """Publish ``event`` on ``subject`` for this node."""
        try:
            await self.bus.publish(subject.to(node=self.bus.node), event)
        except RucherError as err:
            log.warning("event_not_published", subject=subject.pattern, error=err.message)


class BusVolumes:
    """This node's storage service over the bus (``rpc.storage.volume_*.{node}``)."""

    def __init__(self, bus: Bus, timeout: float = STORAGE_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    async def allocate(
        self, storage: str, vmid: int, size: int, fmt: DiskFormat | None
    ) -> VolumeInfo:
        """A new disk volume of ``size`` bytes owned by ``vmid``, named by the storage."""
        command = VolumeAllocate(
            command_id=new_id(), storage=storage, vmid=vmid, size=size, format=fmt
        )
        reply = await self.bus.request(
            VOLUME_ALLOCATE.to(node=self.bus.node), command, timeout=self.timeout
        )
        return reply.volume

    async def free(self, volid: str) -> None:
        """Delete a volume."""
        command = VolumeFree(command_id=new_id(), volid=volid)
        await self.bus.request(VOLUME_FREE.to(node=self.bus.node), command, timeout=self.timeout)

    async def map(self, volid: str) -> VolumeMapping:
        """Where this node's hypervisor finds a volume, with its ``<disk>`` element."""
        command = VolumeMap(command_id=new_id(), volid=volid)
        return await self.bus.request(
            VOLUME_MAP.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def info(self, volid: str) -> VolumeInfo:
        """A volume's attributes."""
        query = s.VolumeInfoQuery(volid=volid)
        reply = await self.bus.request(
            s.VOLUME_INFO.to(node=self.bus.node), query, timeout=self.timeout
        )
        return reply.volume

    async def resize(self, volid: str, size: int) -> VolumeInfo:
        """Grow a volume to ``size`` bytes."""
        command = s.VolumeResize(command_id=new_id(), volid=volid, size=size)
        reply = await self.bus.request(
            s.VOLUME_RESIZE.to(node=self.bus.node), command, timeout=self.timeout
        )
        return reply.volume

    async def snapshot(self, volid: str, snapname: str) -> None:
        """Snapshot a volume."""
        command = s.VolumeSnapshotCreate(command_id=new_id(), volid=volid, snapname=snapname)
        await self.bus.request(
            s.SNAPSHOT_CREATE.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def rollback(self, volid: str, snapname: str) -> None:
        """Roll a volume back to a snapshot."""
        command = s.VolumeSnapshotRollback(command_id=new_id(), volid=volid, snapname=snapname)
        await self.bus.request(
            s.SNAPSHOT_ROLLBACK.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def delete_snapshot(self, volid: str, snapname: str) -> None:
        """Delete a volume snapshot."""
        command = s.VolumeSnapshotDelete(command_id=new_id(), volid=volid, snapname=snapname)
        await self.bus.request(
            s.SNAPSHOT_DELETE.to(node=self.bus.node), command, timeout=self.timeout
        )

    async def create_base(self, volid: str) -> VolumeInfo:
        """Turn a volume into a template base."""
        command = s.VolumeCreateBase(command_id=new_id(), volid=volid)
        reply = await self.bus.request(
            s.VOLUME_CREATE_BASE.to(node=self.bus.node), command, timeout=self.timeout
        )
        return reply.volume

    async def owned_by(self, vmid: int) -> list[str]:
        """Disk volumes named for ``vmid`` on every enabled storage of this node."""
        node = self.bus.node
        status = await self.bus.request(
            s.STATUS.to(node=node),
            s.StorageStatusQuery(content=s.ContentType.IMAGES, enabled_only=True),
            timeout=self.timeout,
        )
        found: list[str] = []
        for storage in status.storages:
            if not storage.active:
                continue
            query = s.ContentListQuery(
                storage=storage.storage, content=s.ContentType.IMAGES, vmid=vmid
            )
            listing = await self.bus.request(
                s.CONTENT_LIST.to(node=node), query, timeout=self.timeout
            )
            found.extend(volume.volid for volume in listing.volumes if volume.vmid == vmid)
        return found

    async def clone(self, volid: str, vmid: int, options: CloneOptions) -> VolumeInfo:
        """A linked or full copy of ``volid`` owned by ``vmid``."""
        command = s.VolumeClone(
            command_id=new_id(),
            volid=volid,
            vmid=vmid,
            linked=options.linked,
            snapname=options.snapname,
            storage=options.storage,
            format=options.format,
        )
        reply = await self.bus.request(
            s.VOLUME_CLONE.to(node=self.bus.node), command, timeout=self.timeout
        )
        return reply.volume


async def setup(context: ServiceContext) -> None:
    """Connect libvirt, reconcile, publish capacity, then answer this node's compute subjects."""
    settings = ComputeSettings.from_env(context.settings)
    await asyncio.to_thread(settings.console_dir.mkdir, parents=True, exist_ok=True)
    kvm = await asyncio.to_thread(kvm_usable)
    hypervisor = CloudInitHypervisor(
        settings.libvirt_uri,
        kvm=kvm,
        qemu_pids=settings.qemu_pid_dir,
        seed_dir=settings.cloudinit_dir,
    )
    service = ComputeService(
        hypervisor,
        GuestRegistry(context.bus),
        context.tasks,
        BusEvents(context.bus),
        volumes=BusVolumes(context.bus),
        node=context.settings.node,
        facts=HostFacts(
            kvm=kvm,
            console_dir=str(settings.console_dir),
            cloudinit_dir=str(settings.cloudinit_dir),
        ),
        shutdown_timeout=settings.shutdown_timeout,
        claim_client=BusClaims(context.bus),
        fence=LeaseFence(context.bus),
        pools=BusPools(context.bus),
        gpu_broker=BusBroker(context.bus),
    )
    drift = await reconcile(service, BusProbes(context.bus))
    log.info("reconciled", uri=settings.libvirt_uri, kvm=kvm, drift=len(drift))
    await service.publish_capacity()

    async def publish_capacity() -> None:
        while True:
            await asyncio.sleep(settings.capacity_interval)
            try:
                await service.publish_capacity()
            except RucherError as err:
                log.warning("capacity_not_published", error=err.message)

    publisher = asyncio.create_task(publish_capacity(), name="compute-capacity")

    async def stop_publisher() -> None:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher

    context.on_stop(stop_publisher)
    await serve(context.bus, service)
    await serve_console_and_rrd(context, settings, service)
    await serve_migration(context, settings, service)


if __name__ == "__main__":
    main("compute", setup)
