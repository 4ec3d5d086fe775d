"""The compute agent's domain logic: Proxmox's ``qm`` lifecycle over the Hypervisor Protocol."""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.compute import admission, claims, destroy, disks, gpu, hibernate, pending
from rucher.compute.disks import VolumeStore
from rucher.compute.domain_xml import HostFacts, domain_name, vmid_of
from rucher.compute.drivers.interface import DomainInfo, Hypervisor
from rucher.compute.fencing import FenceGuard, require_current_epoch
from rucher.compute.pools import PoolDirectory
from rucher.compute.ports import EventSink, GuestStore, TaskBody, TaskLog, TaskSubmitter
from rucher.proto import compute
from rucher.proto.cluster import (
    NODE_CAPACITY_PUBLISHED,
    CapacityPublished,
    CpuArch,
    NodeCapacity,
)
from rucher.proto.common import GuestCommand, PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import ReleaseReason
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.proto.task import TaskAccepted

log = structlog.get_logger("rucher.compute")

POLL = 0.25


@dataclass
class Sample:
    """The last CPU-time reading of a domain, to turn cumulative time into a share."""

    at: float
    cpu_time_ns: int


class ComputeService:
    """One node's virtual machines: admission, lifecycle tasks, status and reconciliation."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        guests: GuestStore,
        tasks: TaskSubmitter,
        events: EventSink,
        *,
        volumes: VolumeStore,
        node: str,
        facts: HostFacts,
        shutdown_timeout: float = 180.0,
        clock: Callable[[], float] = time.time,
        claim_client: claims.ClaimClient | None = None,
        fence: FenceGuard | None = None,
        pools: PoolDirectory | None = None,
        gpu_broker: gpu.Broker | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.guests = guests
        self.tasks = tasks
        self.events = events
        self.volumes = volumes
        self.node = node
        self.facts = facts
        self.shutdown_timeout = shutdown_timeout
        self.clock = clock
        self.claim_client = claim_client
        self.fence = fence
        self.pools = pools
        self.gpu_broker = gpu_broker
        self._samples: dict[int, Sample] = {}

    # Helpers ----------------------------------------------------------------------------

    def event_fields(self) -> dict[str, Any]:
        """The fields every event of this node carries."""
        return {"event_id": new_id(), "node": self.node, "time": self.clock()}

    async def _owned(self, vmid: int, *, skiplock: bool = False) -> GuestRecord:
        record = await self.guests.get(vmid)
        if record.node != self.node or record.type is not GuestType.QEMU:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"Configuration file 'nodes/{self.node}/qemu-server/{vmid}.conf' does not exist",
            )
        if record.lock is not None and not skiplock:
            raise RucherError(
                ErrorCode.LOCKED, f"VM is locked ({record.lock})", details={"lock": record.lock}
            )
        return record

    async def owned(self, vmid: int, *, skiplock: bool = False) -> GuestRecord:
        """This node's VM ``vmid``, refused while locked unless ``skiplock``."""
        return await self._owned(vmid, skiplock=skiplock)

    async def power_state(self, vmid: int) -> PowerState:
        """The VM's run state as libvirt sees it (stopped when not defined)."""
        return await self._state(vmid)

    async def submit(self, kind: str, command: GuestCommand, body: TaskBody) -> TaskAccepted:
        """Run ``body`` as a task of type ``kind`` for ``command``'s guest."""
        return await self._submit(kind, command, body)

    async def _state(self, vmid: int) -> PowerState:
        info = await self.hypervisor.info(domain_name(vmid))
        return PowerState.STOPPED if info is None else info.state

    async def state_changed(
        self, vmid: int, state: PowerState, previous: PowerState | None, upid: str | None
    ) -> None:
        """Publish a guest's run-state change."""
        event = compute.VmStateChanged(
            **self.event_fields(), vmid=vmid, state=state, previous=previous, upid=upid
        )
        await self.events.emit(compute.GUEST_STATE_CHANGED, event)

    async def _submit(self, kind: str, command: GuestCommand, body: TaskBody) -> TaskAccepted:
        upid = await self.tasks.submit(
            task_type=kind,
            task_id=str(command.vmid),
            user=command.user,
            body=body,
            command_id=command.command_id,
        )
        return TaskAccepted(upid=upid)

    async def define(self, record: GuestRecord, hostdevs: Mapping[str, str] | None = None) -> None:
        """(Re)define a guest's domain from its current config, its volumes mapped again.

        ``hostdevs`` are the ``<hostdev>`` elements of the PCI devices leased for a start.
        """
        volumes = await self.map_volumes(record.config)
        await self.hypervisor.define(
            admission.render(record.vmid, record.config, self.facts, volumes, hostdevs)
        )

    async def map_volumes(self, config: Mapping[str, str]) -> dict[str, str]:
        """The ``<disk>`` element of every storage volume of ``config``, by key.

        A volume or storage the storage service does not know is ``invalid`` naming the key;
        anything else (the service is down, a timeout) stays what it is, so callers may retry.
        """
        mapped: dict[str, str] = {}
        for key, volid in disks.volume_ids(config).items():
            try:
                mapping = await self.volumes.map(volid)
            except RucherError as err:
                if err.code not in {ErrorCode.NOT_FOUND, ErrorCode.INVALID}:
                    raise
                raise admission.invalid(key, f"{key}: {err.message}") from err
            if not mapping.libvirt_disk:
                raise admission.invalid(key, f"{key}: volume '{volid}' is not a disk image")
            if mapping.secret_usage and mapping.secret:
                # An rbd disk names its cephx key by usage: each node's libvirtd holds its own.
                key_bytes = base64.b64decode(mapping.secret)
                await self.hypervisor.define_secret(mapping.secret_usage, key_bytes)
            mapped[key] = mapping.libvirt_disk
        return mapped

    async def free_volumes(
        self, vmid: int, config: Mapping[str, str], task: TaskLog | None
    ) -> None:
        """Delete the volumes ``vmid`` owns; one that cannot go is reported and left (Proxmox)."""
        for volid in disks.owned_volumes(config, vmid):
            try:
                await self.volumes.free(volid)
            except RucherError as err:
                log.warning("volume_not_freed", vmid=vmid, volid=volid, error=err.message)
                if task is not None:
                    await task.log(
                        f"Could not remove disk '{volid}', check manually: {err.message}"
                    )
                continue
            if task is not None:
                await task.log(f"removed volume '{volid}'")

    async def _wait_stopped(self, vmid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._state(vmid) is PowerState.STOPPED:
                return True
            await asyncio.sleep(POLL)
        return await self._state(vmid) is PowerState.STOPPED

    # Create and destroy -----------------------------------------------------------------

    async def create(self, command: compute.VmCreate) -> TaskAccepted:
        """Check the config, take the VMID (locked ``create``), then define it in a task."""
        config = dict(command.config)
        admission.render(command.vmid, config, self.facts)
        admission.check_node(config, await self.hypervisor.node(), await self.hypervisor.bridges())
        await gpu.check_mappings(self.gpu_broker, config)
        config = admission.with_macs(config)
        try:
            await self.guests.get(command.vmid)
        except RucherError as err:
            if err.code is not ErrorCode.NOT_FOUND:
                raise
        else:
            raise admission.invalid("vmid", f"VM {command.vmid} already exists")
        existing = await self.map_volumes(config)
        try:
            await self.guests.register(
                guest_type=GuestType.QEMU, node=self.node, config=config, vmid=command.vmid
            )
        except RucherError as taken:
            if taken.code is ErrorCode.EXISTS:
                raise admission.invalid("vmid", taken.message) from taken
            raise

        async def body(task: TaskLog) -> None:
            name = domain_name(command.vmid)
            undo: list[Callable[[], Awaitable[None]]] = [
                claims.release_failed(self.claim_client, command),
                lambda: self.guests.remove(command.vmid, lock_held=GuestLock.CREATE),
            ]
            done = False
            try:
                volumes = {
                    **existing,
                    **await self._allocate(command.vmid, config, task, undo),
                }
                xml = admission.render(command.vmid, config, self.facts, volumes)
                await task.log(f"defining VM {command.vmid} as libvirt domain {name}")
                await self.hypervisor.define(xml)
                undo.append(lambda: self.hypervisor.undefine(name))
                await self.guests.clear_lock(command.vmid, GuestLock.CREATE)
                created = compute.VmCreated(
                    **self.event_fields(),
                    vmid=command.vmid,
                    name=config.get("name", ""),
                    upid=task.upid,
                )
                await self.events.emit(compute.GUEST_CREATED, created)
                await self.state_changed(command.vmid, PowerState.STOPPED, None, task.upid)
                done = True
                await claims.confirm_created(self.claim_client, command, task.log)
            finally:
                if not done:
                    await task.log("create failed: removing what was made")
                    await _undo(undo)
            if command.start:
                await task.log(f"starting VM {command.vmid}")
                await gpu.start_created(self, command.vmid, config, command.command_id, task)
                await self.state_changed(
                    command.vmid, PowerState.RUNNING, PowerState.STOPPED, task.upid
                )

        try:
            return await self._submit("qmcreate", command, body)
        except BaseException:
            await _undo([lambda: self.guests.remove(command.vmid, lock_held=GuestLock.CREATE)])
            raise

    async def _allocate(
        self,
        vmid: int,
        config: dict[str, str],
        task: TaskLog,
        undo: list[Callable[[], Awaitable[None]]],
    ) -> dict[str, str]:
        """Allocate each ``STORAGE:SIZE`` disk of ``config`` and map it.

        Each volume id goes into ``config`` and the guest's document at once, so an interrupted
        create still knows what it made; freeing it is an undo step.
        """
        allocated: dict[str, str] = {}
        for request in disks.requested(config):
            volume = await self.volumes.allocate(
                request.storage, vmid, request.size, request.format
            )
            undo.append(functools.partial(self.volumes.free, volume.volid))
            config[request.key] = disks.recorded(config[request.key], volume.volid, volume.size)
            allocated[request.key] = config[request.key]
            await task.log(f"{request.key}: allocated volume '{volume.volid}'")
            await self.guests.update(
                vmid, changes={request.key: config[request.key]}, lock_held=GuestLock.CREATE
            )
        return await self.map_volumes(allocated)

    async def destroy(self, command: compute.VmDestroy) -> TaskAccepted:
        """Remove a stopped VM's domain, the volumes it owns and its document.

        Like ``qm destroy``, the guest's own disks (also those of snapshots and pending changes)
        go whether or not ``purge`` is set, and it leaves its pools (``purge`` is about backup
        jobs, replication and HA, which do not exist here yet); ISOs and other guests' volumes
        stay. ``destroy_unreferenced_disks`` also removes volumes named for it that no config
        mentions.
        """
        owned = await self._owned(command.vmid, skiplock=command.skiplock)
        if await self._state(command.vmid) is not PowerState.STOPPED:
            raise admission.invalid("vmid", f"VM {command.vmid} is running - destroy failed")
        await destroy.refuse_if_linked(self, owned)

        async def body(task: TaskLog) -> None:
            await self.hypervisor.undefine(domain_name(command.vmid))
            await task.log(f"undefined libvirt domain {domain_name(command.vmid)}")
            record = await self.guests.get(command.vmid)
            await destroy.free_everything(self, record, command.destroy_unreferenced_disks, task)
            await self.guests.remove(
                command.vmid, lock_held=record.lock if command.skiplock else None
            )
            await destroy.leave_pools(self, command.vmid, command.user, task)
            self._samples.pop(command.vmid, None)
            await claims.release_destroyed(self.claim_client, command.vmid)
            await gpu.give_back(self.gpu_broker, command.vmid, ReleaseReason.GUEST_DESTROYED)
            await self.events.emit(
                compute.GUEST_DESTROYED,
                compute.VmDestroyed(**self.event_fields(), vmid=command.vmid, upid=task.upid),
            )

        return await self._submit("qmdestroy", command, body)

    async def update_config(self, command: compute.VmConfigUpdate) -> TaskAccepted:
        """Check and write config changes (``pending`` keeps what a running guest gets later)."""
        await gpu.check_mappings(self.gpu_broker, command.config)
        return await pending.update_config(self, command)

    # Power ------------------------------------------------------------------------------

    async def start(self, command: compute.VmStart) -> TaskAccepted:
        """Redefine the domain from the current config (pending changes apply) and start it.

        A hibernated guest is restored from its state volume instead.
        """
        owned = await self._owned(command.vmid, skiplock=True)
        hibernate.refuse_unless_resumable(owned, command.skiplock)
        if owned.config.get("template") == "1":
            raise admission.invalid("vmid", "you can't start a vm if it's a template")
        if await self._state(command.vmid) is not PowerState.STOPPED:
            raise admission.invalid("vmid", f"VM {command.vmid} already running")

        async def body(task: TaskLog) -> None:
            if hibernate.hibernated(record := await self.guests.get(command.vmid)):
                await require_current_epoch(self.fence, command)
                await hibernate.resume(self, record, task)
                await self.state_changed(
                    command.vmid, PowerState.RUNNING, PowerState.STOPPED, task.upid
                )
                return
            record = await pending.apply_pending(self, command.vmid)
            # As late as possible: a start issued before a fence must not run after it.
            await gpu.define_and_start(
                self,
                record,
                command.command_id,
                task,
                functools.partial(require_current_epoch, self.fence, command),
            )
            await task.log(f"VM {command.vmid} started")
            await self.state_changed(
                command.vmid, PowerState.RUNNING, PowerState.STOPPED, task.upid
            )

        return await self._submit("qmstart", command, body)

    async def _running(self, vmid: int, skiplock: bool) -> PowerState:
        await self._owned(vmid, skiplock=skiplock)
        state = await self._state(vmid)
        if state is PowerState.STOPPED:
            raise admission.invalid("vmid", f"VM {vmid} not running")
        return state

    async def stop(self, command: compute.VmStop) -> TaskAccepted:
        """Pull the plug."""
        previous = await self._running(command.vmid, command.skiplock)

        async def body(task: TaskLog) -> None:
            await self.hypervisor.stop(domain_name(command.vmid))
            await self.state_changed(command.vmid, PowerState.STOPPED, previous, task.upid)
            await gpu.devices_stopped(self, command.vmid)

        return await self._submit("qmstop", command, body)

    async def shutdown(self, command: compute.VmShutdown) -> TaskAccepted:
        """ACPI power button; after ``timeout``, stop it with ``force_stop`` or fail."""
        previous = await self._running(command.vmid, command.skiplock)
        timeout = self.shutdown_timeout if command.timeout is None else float(command.timeout)

        async def body(task: TaskLog) -> None:
            name = domain_name(command.vmid)
            await self.hypervisor.shutdown(name)
            if not await self._wait_stopped(command.vmid, timeout):
                if not command.force_stop:
                    raise RucherError(ErrorCode.TIMEOUT, "VM quit/powerdown failed - got timeout")
                await task.log("VM still running - terminating now")
                await self.hypervisor.stop(name)
            await self.state_changed(command.vmid, PowerState.STOPPED, previous, task.upid)
            await gpu.devices_stopped(self, command.vmid)

        return await self._submit("qmshutdown", command, body)

    async def reboot(self, command: compute.VmReboot) -> TaskAccepted:
        """Shut down (ACPI, waiting ``timeout``), then start again with the current config."""
        previous = await self._running(command.vmid, False)
        timeout = self.shutdown_timeout if command.timeout is None else float(command.timeout)

        async def body(task: TaskLog) -> None:
            name = domain_name(command.vmid)
            await self.hypervisor.shutdown(name)
            if not await self._wait_stopped(command.vmid, timeout):
                raise RucherError(ErrorCode.TIMEOUT, "VM quit/powerdown failed - got timeout")
            await self.state_changed(command.vmid, PowerState.STOPPED, previous, task.upid)
            record = await pending.apply_pending(self, command.vmid)
            await gpu.define_and_start(self, record, command.command_id, task)
            await self.state_changed(
                command.vmid, PowerState.RUNNING, PowerState.STOPPED, task.upid
            )

        return await self._submit("qmreboot", command, body)

    async def reset(self, command: compute.VmReset) -> TaskAccepted:
        """Press the reset button."""
        await self._running(command.vmid, command.skiplock)

        async def body(task: TaskLog) -> None:
            await self.hypervisor.reset(domain_name(command.vmid))

        return await self._submit("qmreset", command, body)

    async def suspend(self, command: compute.VmSuspend) -> TaskAccepted:
        """Pause the vCPUs; with ``todisk``, hibernate the guest to a state volume."""
        if command.todisk:
            return await hibernate.suspend_to_disk(self, command)
        previous = await self._running(command.vmid, command.skiplock)

        async def body(task: TaskLog) -> None:
            await self.hypervisor.suspend(domain_name(command.vmid))
            await self.state_changed(command.vmid, PowerState.PAUSED, previous, task.upid)

        return await self._submit("qmsuspend", command, body)

    async def resume(self, command: compute.VmResume) -> TaskAccepted:
        """Resume paused vCPUs."""
        previous = await self._running(command.vmid, command.skiplock)
        if previous is not PowerState.PAUSED:
            raise admission.invalid("vmid", f"VM {command.vmid} is not paused")

        async def body(task: TaskLog) -> None:
            await self.hypervisor.resume(domain_name(command.vmid))
            await self.state_changed(command.vmid, PowerState.RUNNING, previous, task.upid)

        return await self._submit("qmresume", command, body)

    # Status and capacity ----------------------------------------------------------------

    async def status(self, query: compute.VmStatusQuery) -> compute.VmStatusReport:
        """``status/current`` from libvirt: state, uptime, CPU share, memory."""
        record = await self._owned(query.vmid, skiplock=True)
        info = await self.hypervisor.info(domain_name(query.vmid))
        if info is None or info.state is PowerState.STOPPED:
            self._samples.pop(query.vmid, None)
            return self._report(record, info, 0.0)
        return self._report(record, info, self._cpu_share(query.vmid, info))

    def _cpu_share(self, vmid: int, info: DomainInfo) -> float:
        now = time.monotonic()
        last = self._samples.get(vmid)
        self._samples[vmid] = Sample(at=now, cpu_time_ns=info.cpu_time_ns)
        if last is None or now <= last.at or info.cpu_time_ns < last.cpu_time_ns:
            return 0.0
        used = (info.cpu_time_ns - last.cpu_time_ns) / 1e9
        return max(0.0, used / ((now - last.at) * max(1, info.vcpus)))

    def _report(
        self, record: GuestRecord, info: DomainInfo | None, cpu: float
    ) -> compute.VmStatusReport:
        config = record.config
        sockets = int(config.get("sockets", "1") or 1)
        cores = int(config.get("cores", "1") or 1)
        memory = int((config.get("memory", "512") or "512").split(",")[0].removeprefix("current="))
        state = PowerState.STOPPED if info is None else info.state
        return compute.VmStatusReport(
            vmid=record.vmid,
            status=state,
            name=config.get("name", f"VM {record.vmid}"),
            uptime=info.uptime if info else 0.0,
            cpu=cpu,
            cpus=sockets * cores,
            mem=info.memory if info else 0,
            maxmem=info.max_memory if info and info.max_memory else memory << 20,
            pid=info.pid if info else None,
            lock=record.lock,
            template=config.get("template") == "1",
            tags=tuple(tag for tag in config.get("tags", "").replace(",", ";").split(";") if tag),
        )

    async def capacity(self) -> NodeCapacity:
        """This node's CPUs, memory and load, for the scheduler and ``/nodes/{node}/status``."""
        facts = await self.hypervisor.node()
        arch = CpuArch(facts.arch) if facts.arch in set(CpuArch) else CpuArch.X86_64
        return NodeCapacity(
            node=self.node,
            arch=arch,
            cpu_model=facts.cpu_model,
            cpus=facts.cpus,
            sockets=facts.sockets,
            memory_total=facts.memory_total,
            memory_used=facts.memory_used,
            time=self.clock(),
            cpu_flags=facts.cpu_flags,
            cpu_usage=min(1.0, facts.loadavg[0] / facts.cpus),
            loadavg=facts.loadavg,
            uptime=facts.uptime,
            kvm=self.hypervisor.kvm,
        )

    async def publish_capacity(self) -> None:
        """Publish :meth:`capacity` as ``cluster.node.capacity_published``."""
        event = CapacityPublished(**self.event_fields(), capacity=await self.capacity())
        await self.events.emit(NODE_CAPACITY_PUBLISHED, event)


async def _undo(steps: list[Callable[[], Awaitable[None]]]) -> None:
    """Run undo steps newest first; one failing does not stop the others."""
    for step in reversed(steps):
        try:
            await step()
        except RucherError as err:
            log.warning("undo_step_failed", error=err.message, code=err.code)


def vmids(domains: Iterable[DomainInfo]) -> dict[int, DomainInfo]:
    """Rucher's domains by VMID (others are not Rucher's to touch)."""
    return {vmid: info for info in domains if (vmid := vmid_of(info.name)) is not None}
