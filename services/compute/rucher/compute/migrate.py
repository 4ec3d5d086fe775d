"""Moving a VM between nodes: Proxmox's preconditions, live (libvirt peer to peer) and offline.

The source agent drives a migration as a task. It locks the guest (``migrate``), asks the target
agent to prepare (the target checks the guest fits, maps its disks through its own storage
service, defines the cephx secrets they need and renders the domain for itself), then either
streams the running guest to the target's libvirtd, or, for a stopped guest, moves nothing but
the definition. Local disks (``with-local-disks``) are copied by QEMU's NBD mirror into twins the
target allocates; a stopped guest with local disks crosses over as a paused domain, never run.
Ownership moves (``rucher.guests`` transfer, fenced by the guest's owner token)
only once the guest runs on the target; before that every failure leaves the guest where it was,
running, and libvirt leaves nothing on the target. The target defines the guest on ``finish``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.compute import admission, disks
from rucher.compute.domain_xml import DISK_KEY, domain_name
from rucher.compute.drivers.interface import MigrationTarget
from rucher.compute.ports import TaskLog
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.common import Done, PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord, GuestType
from rucher.proto.storage import DiskFormat, VolumeProtocol
from rucher.proto.task import TaskAccepted

log = structlog.get_logger("rucher.compute.migrate")

# Devices bound to this host (Proxmox's ``check_local_resources``): they block a migration.
LOCAL_RESOURCE = re.compile(r"^(hostpci|usb|parallel)\d+$")
SERIAL = re.compile(r"^serial\d+$")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$")
SHARED_PROTOCOLS = frozenset({VolumeProtocol.RBD})


class MigrationGuests(Protocol):
    """The guest registry operations a migration needs (``rucher.guests.GuestRegistry``)."""

    async def get(self, vmid: int) -> GuestRecord:
        """One document, or ``not_found``."""

    async def set_lock(
        self, vmid: int, lock: GuestLock, *, digest: str | None = None
    ) -> GuestRecord:
        """Take ``lock`` on an unlocked guest."""

    async def clear_lock(self, vmid: int, lock: GuestLock) -> GuestRecord:
        """Release ``lock``."""

    async def update(
        self,
        vmid: int,
        *,
        changes: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        digest: str | None = None,
        lock_held: GuestLock | None = None,
    ) -> GuestRecord:
        """Change config keys."""

    async def transfer(
        self, vmid: int, *, from_node: str, to_node: str, token: int = 0
    ) -> GuestRecord:
        """Move ownership in one atomic write, fenced by ``token``."""


class Peers(Protocol):
    """The other nodes' compute agents, as a migration source or target talks to them."""

    async def nodes(self) -> set[str]:
        """Nodes whose compute agent is registered now."""

    async def prepare(self, node: str, command: compute.VmMigratePrepare) -> compute.VmMigrateReady:
        """Ask ``node`` to get ready to receive a guest."""

    async def finish(self, node: str, command: compute.VmMigrateFinish) -> None:
        """Tell ``node`` the guest is its own now."""

    async def abort(self, node: str, command: compute.VmMigrateAbort) -> None:
        """Tell ``node`` the migration failed: it frees what it prepared."""

    async def storages(self, node: str) -> set[str] | None:
        """The storages enabled and active on ``node``; None when its storage service is silent."""


def target_storages(spec: str | None) -> dict[str, str]:
    """Proxmox's ``targetstorage`` (``storage-pair-list``) as source → target storage.

    ``"1"`` or nothing keeps each storage; a single id takes every disk; ``a:b`` pairs map
    storages one by one, and a lone id among pairs is the default (key ``""``).
    """
    if spec is None or spec.strip() in {"", "1"}:
        return {}
    mapping: dict[str, str] = {}
    for item in re.split(r"[,;\s]+", spec.strip()):
        source, _, target = item.partition(":")
        if target:
            mapping[source] = target
        elif item:
            mapping[""] = item
    return mapping


def _size(value: str) -> int:
    """The bytes of a disk's ``size=`` option (``32G``), or 0."""
    for part in value.split(",")[1:]:
        name, _, text = part.partition("=")
        found = SIZE.match(text) if name == "size" else None
        if found is not None:
            return int(float(found[1]) * (1 << (10 * " KMGT".index(found[2] or " "))))
    return 0


def local_resources(config: Mapping[str, str]) -> tuple[str, ...]:
    """Config keys naming devices of this host: PCI and USB passthrough, host serial ports."""
    found = [key for key in config if LOCAL_RESOURCE.match(key)]
    found += [key for key in config if SERIAL.match(key) and config[key].startswith("/dev/")]
    return tuple(sorted(found))


class Migrator:
    """One node's half of every migration: the source's task and the target's two steps."""

    def __init__(
        self,
        service: ComputeService,
        guests: MigrationGuests,
        peers: Peers,
        *,
        migration_address: str | None = None,
        peer_uri: str | None = None,
    ) -> None:
        self.service = service
        self.guests = guests
        self.peers = peers
        self.migration_address = migration_address
        self.peer_uri = peer_uri
        # Volumes allocated here for incoming migrations, freed if the migration fails.
        self._incoming: dict[int, list[str]] = {}

    @property
    def node(self) -> str:
        """This node's name."""
        return self.service.node

    async def _owned(self, vmid: int) -> GuestRecord:
        record = await self.guests.get(vmid)
        if record.node != self.node or record.type is not GuestType.QEMU:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"Configuration file 'nodes/{self.node}/qemu-server/{vmid}.conf' does not exist",
            )
        return record

    async def _running(self, vmid: int) -> bool:
        info = await self.service.hypervisor.info(domain_name(vmid))
        return info is not None and info.state is not PowerState.STOPPED

    async def local_disks(self, config: Mapping[str, str]) -> tuple[compute.LocalDisk, ...]:
        """The config's disks that only this node reaches (anything not on shared storage)."""
        found: list[compute.LocalDisk] = []
        keys = [*disks.disk_keys(config), *sorted(k for k in config if disks.UNUSED_KEY.match(k))]
        for key in keys:
            value = config[key]
            volid = disks.disk_file(value)
            cdrom = "media=cdrom" in value.split(",")[1:]
            if volid in {"none", "cdrom"} or disks.NEW_DISK.match(volid):
                continue
            if not volid.startswith("/"):
                try:
                    mapping = await self.service.volumes.map(volid)
                except RucherError as err:
                    if err.code not in {ErrorCode.NOT_FOUND, ErrorCode.INVALID}:
                        raise
                    raise admission.invalid(key, f"{key}: {err.message}") from err
                if mapping.protocol in SHARED_PROTOCOLS:
                    continue
            found.append(
                compute.LocalDisk(
                    volid=volid,
                    size=_size(value),
                    cdrom=cdrom,
                    is_unused=not DISK_KEY.match(key),
                )
            )
        return tuple(found)

    # Source: preconditions and the migration task -----------------------------------------

    async def check(self, query: compute.VmMigrateCheck) -> compute.VmMigrateCheckReport:
        """``GET .../migrate``: run state, where the guest may go, what keeps it here."""
        record = await self._owned(query.vmid)
        others = sorted((await self.peers.nodes()) - {self.node})
        refused: dict[str, str] = {}
        missing: dict[str, tuple[str, ...]] = {}
        if query.target is not None and query.target not in others:
            refused[query.target] = self._unknown_target(query.target)
        for node in others:
            reason, lacking = await self._storages_missing(node, record.config, None)
            if reason:
                refused[node] = reason
                missing[node] = lacking
        return compute.VmMigrateCheckReport(
            vmid=query.vmid,
            running=await self._running(query.vmid),
            allowed_nodes=tuple(node for node in others if node not in refused),
            not_allowed_nodes=refused,
            local_disks=await self.local_disks(record.config),
            local_resources=local_resources(record.config),
            unavailable_storages=missing,
        )

    async def _storages_missing(
        self, node: str, config: Mapping[str, str], targetstorage: str | None
    ) -> tuple[str, tuple[str, ...]]:
        """Why ``node`` lacks a storage the guest's volumes need there ("" when it lacks none)."""
        storages = target_storages(targetstorage)
        needed = set()
        for volid in disks.volume_ids(config).values():
            storage = volid.partition(":")[0]
            needed.add(storages.get(storage, storages.get("", storage)) if storages else storage)
        if not needed:
            return "", ()
        available = await self.peers.storages(node)
        if available is None:
            return f"the storage service of node '{node}' does not answer", ()
        lacking = tuple(sorted(needed - available))
        if not lacking:
            return "", ()
        return f"storage '{lacking[0]}' is not available on node '{node}'", lacking

    def _unknown_target(self, target: str) -> str:
        if target == self.node:
            return "target is local node."
        return f"no such cluster node '{target}' (no compute agent runs there)"

    async def migrate(self, command: compute.VmMigrate) -> TaskAccepted:
        """Check Proxmox's preconditions, lock the guest, then migrate it in a task."""
        record = await self._owned(command.vmid)
        if record.lock is not None:
            raise RucherError(
                ErrorCode.LOCKED, f"VM is locked ({record.lock})", details={"lock": record.lock}
            )
        if command.target == self.node or command.target not in await self.peers.nodes():
            raise admission.invalid("target", self._unknown_target(command.target))
        reason, _ = await self._storages_missing(
            command.target,
            record.config,
            command.targetstorage if command.with_local_disks else None,
        )
        if reason:
            raise admission.invalid("target", reason)
        running = await self._running(command.vmid)
        if running and not command.online:
            raise admission.invalid("online", "can't migrate running VM without --online")
        devices = local_resources(record.config)
        if devices and not command.force:
            names = ", ".join(devices)
            raise admission.invalid("force", f"can't migrate VM which uses local devices: {names}")
        local = await self.local_disks(record.config)
        if local and not command.with_local_disks:
            raise admission.invalid(
                "with-local-disks",
                f"can't migrate local disk '{local[0].volid}': use --with-local-disks "
                "(or move it to shared storage)",
            )
        copies = await self._copies(command, record.config, local) if local else ()
        record = await self.guests.set_lock(command.vmid, GuestLock.MIGRATE)

        async def body(task: TaskLog) -> None:
            try:
                await self._move(command, record, running, copies, task)
            except BaseException:
                await self.guests.clear_lock(command.vmid, GuestLock.MIGRATE)
                raise

        try:
            upid = await self.service.tasks.submit(
                task_type="qmigrate",
                task_id=str(command.vmid),
                user=command.user,
                body=body,
                command_id=command.command_id,
            )
        except BaseException:
            await self.guests.clear_lock(command.vmid, GuestLock.MIGRATE)
            raise
        return TaskAccepted(upid=upid)

    async def _copies(
        self,
        command: compute.VmMigrate,
        config: Mapping[str, str],
        local: tuple[compute.LocalDisk, ...],
    ) -> tuple[compute.DiskCopy, ...]:
        """What a migration with ``with-local-disks`` copies, each disk with its target."""

        def unsupported(message: str) -> RucherError:
            return RucherError(
                ErrorCode.UNSUPPORTED, message, details={"field": "with-local-disks"}
            )

        for disk in local:
            if disk.cdrom:
                raise admission.invalid(
                    "with-local-disks", f"can't migrate local cdrom drive '{disk.volid}'"
                )
            if disk.is_unused or disk.volid.startswith("/"):
                raise unsupported(f"can't copy '{disk.volid}': only attached volumes are copied")
        storages = target_storages(command.targetstorage)
        wanted = {disk.volid for disk in local}
        copies = []
        for key in disks.disk_keys(config):
            volid = disks.disk_file(config[key])
            if volid not in wanted:
                continue
            info = await self.service.volumes.info(volid)
            storage = volid.partition(":")[0]
            copies.append(
                compute.DiskCopy(
                    key=key,
                    volid=volid,
                    size=info.size,
                    format=info.format,
                    storage=storages.get(storage, storages.get("", storage)),
                )
            )
        return tuple(copies)

    async def _move(
        self,
        command: compute.VmMigrate,
        record: GuestRecord,
        running: bool,
        copies: tuple[compute.DiskCopy, ...],
        task: TaskLog,
    ) -> None:
        vmid, target, name = command.vmid, command.target, domain_name(command.vmid)
        kind = "online" if running else "offline"
        await task.log(f"starting {kind} migration of VM {vmid} to node '{target}'")
        # Disks copy only on the live path (QEMU's NBD mirror): a stopped guest with local disks
        # moves as a paused domain whose vCPUs never run, and is stopped on the target after.
        live = running or bool(copies)
        ready = await self.peers.prepare(
            target,
            compute.VmMigratePrepare(
                command_id=new_id(),
                vmid=vmid,
                user=command.user,
                source=self.node,
                online=live,
                copy_disks=copies,
            ),
        )
        for copy in copies:
            await task.log(f"{copy.key}: copying '{copy.volid}' to '{ready.volumes[copy.key]}'")
        downtime: float | None = None
        if live:
            await task.log(f"migrating the VM to {ready.peer_uri} ({ready.migrate_uri})")
            started = time.monotonic()
            try:
                if not running:
                    await self.service.hypervisor.start_paused(name)
                await self.service.hypervisor.migrate(
                    name,
                    MigrationTarget(
                        peer_uri=ready.peer_uri,
                        migrate_uri=ready.migrate_uri,
                        domain_xml=ready.domain_xml,
                        bandwidth_kib=command.bwlimit or 0,
                        tunnelled=command.tunnelled,
                        copy_sources=await self._sources(copies),
                    ),
                )
            except BaseException:
                await self._abort(target, command)
                if not running:
                    await self.service.hypervisor.stop(name)
                raise
            downtime = time.monotonic() - started
            where = "runs" if running else "is"
            await task.log(f"migration finished in {downtime:.1f} s: VM {where} on '{target}'")
        # While this node still owns the guest, its storage service sees the disks detached here.
        for copy in copies:
            try:
                await self.service.volumes.free(copy.volid)
            except RucherError as err:
                await task.log(f"could not remove '{copy.volid}', check manually: {err.message}")
            else:
                await task.log(f"removed the copied volume '{copy.volid}' here")
        try:
            await self.guests.transfer(
                vmid, from_node=self.node, to_node=target, token=record.owner_token
            )
        except RucherError as err:
            if running:
                log.exception("migrated_guest_not_transferred", vmid=vmid, target=target)
                await task.log(f"VM runs on '{target}' but its ownership could not move")
            raise RucherError(err.code, f"ownership did not move: {err.message}") from err
        if copies:
            changes = {
                copy.key: record.config[copy.key].replace(copy.volid, ready.volumes[copy.key], 1)
                for copy in copies
            }
            await self.guests.update(vmid, changes=changes, lock_held=GuestLock.MIGRATE)
        await self.guests.clear_lock(vmid, GuestLock.MIGRATE)
        await task.log(f"VM {vmid} belongs to node '{target}' now")
        await self._release_claims_here(vmid)
        await self.service.hypervisor.undefine(name)
        try:
            await self.peers.finish(
                target,
                compute.VmMigrateFinish(
                    command_id=new_id(),
                    vmid=vmid,
                    user=command.user,
                    source=self.node,
                    online=running,
                    claim_id=command.claim_id,
                    claim_token=command.claim_token,
                ),
            )
        except RucherError as err:
            # The target defines the guest from its config at its next start or reconcile.
            log.warning("migrate_finish_failed", vmid=vmid, target=target, error=err.message)
            await task.log(f"node '{target}' did not confirm: {err.message}")
        # No state change from here: the guest did not stop, and the target's ``finish`` has
        # published its state (a late STOPPED from this node would overwrite it in read models).
        migrated = compute.VmMigrated(
            **self.service.event_fields(),
            vmid=vmid,
            target=target,
            online=running,
            downtime=downtime,
            upid=task.upid,
        )
        await self.service.events.emit(compute.GUEST_MIGRATED, migrated)

    async def _release_claims_here(self, vmid: int) -> None:
        """The guest left: the scheduler's claims of it on this node give their room back."""
        client = self.service.claim_client
        if client is None:
            return
        try:
            await client.release_guest(vmid, "guest migrated away")
        except RucherError as err:
            log.warning("claim_release_lost", vmid=vmid, error=err.message)

    async def _sources(self, copies: tuple[compute.DiskCopy, ...]) -> tuple[str, ...]:
        """Where this node's hypervisor finds each copied volume (the disk's source path)."""
        return tuple([(await self.service.volumes.map(copy.volid)).path for copy in copies])

    async def _abort(self, target: str, command: compute.VmMigrate) -> None:
        """Ask the target to free what it prepared; a failure here is only logged."""
        try:
            await self.peers.abort(
                target,
                compute.VmMigrateAbort(
                    command_id=new_id(),
                    vmid=command.vmid,
                    user=command.user,
                    source=self.node,
                    claim_id=command.claim_id,
                ),
            )
        except RucherError as err:
            log.warning("migrate_abort_failed", vmid=command.vmid, target=target, error=err.message)

    # Target: prepare, abort and finish ----------------------------------------------------

    async def prepare(self, command: compute.VmMigratePrepare) -> compute.VmMigrateReady:
        """Check the incoming guest fits here, map its disks here, render its domain here."""
        record = await self.guests.get(command.vmid)
        if record.node != command.source or record.lock is not GuestLock.MIGRATE:
            raise RucherError(
                ErrorCode.CONFLICT,
                f"VM {command.vmid} is not being migrated from node {command.source}",
                details={"node": record.node},
            )
        if await self.service.hypervisor.info(domain_name(command.vmid)) is not None:
            raise RucherError(
                ErrorCode.CONFLICT,
                f"a domain {domain_name(command.vmid)} already exists on node {self.node}",
            )
        if command.online and (not self.migration_address or not self.peer_uri):
            raise RucherError(
                ErrorCode.UNSUPPORTED,
                f"node {self.node} takes no live migration: its agent has no migration address",
            )
        hypervisor = self.service.hypervisor
        admission.check_node(record.config, await hypervisor.node(), await hypervisor.bridges())
        config = dict(record.config)
        allocated: list[str] = []
        try:
            for copy in command.copy_disks:
                volid = await self._allocate_twin(command.vmid, copy, allocated)
                config[copy.key] = config[copy.key].replace(copy.volid, volid, 1)
            volumes = await self.service.map_volumes(config)
            xml = admission.render(command.vmid, config, self.service.facts, volumes)
        except BaseException:
            await self._free(allocated)
            raise
        self._incoming[command.vmid] = allocated
        copied = {copy.key: disks.disk_file(config[copy.key]) for copy in command.copy_disks}
        if not command.online:
            return compute.VmMigrateReady(domain_xml=xml, volumes=copied)
        return compute.VmMigrateReady(
            domain_xml=xml,
            peer_uri=self.peer_uri or "",
            migrate_uri=f"tcp://{self.migration_address}",
            volumes=copied,
        )

    async def _allocate_twin(self, vmid: int, copy: compute.DiskCopy, allocated: list[str]) -> str:
        """A new volume for ``copy`` on its target storage, exactly as large (QEMU mirrors it)."""
        fmt = DiskFormat(copy.format) if copy.format in set(DiskFormat) else None
        volume = await self.service.volumes.allocate(copy.storage, vmid, copy.size, fmt)
        allocated.append(volume.volid)
        if volume.size != copy.size:
            raise RucherError(
                ErrorCode.UNSUPPORTED,
                f"{copy.key}: storage '{copy.storage}' makes {volume.size} bytes of "
                f"the {copy.size} bytes of '{copy.volid}'",
            )
        return volume.volid

    async def _free(self, volids: list[str]) -> None:
        for volid in volids:
            try:
                await self.service.volumes.free(volid)
            except RucherError as err:
                log.warning("migrate_volume_not_freed", volid=volid, error=err.message)

    async def abort(self, command: compute.VmMigrateAbort) -> Done:
        """The migration failed: free the disks prepared for it, unless the guest is ours."""
        allocated = self._incoming.pop(command.vmid, [])
        record = await self.guests.get(command.vmid)
        if record.node != self.node:
            await self._free(allocated)
            client = self.service.claim_client
            if client is not None and command.claim_id is not None:
                await client.release(command.claim_id, command.vmid, "migration failed")
        return Done()

    async def finish(self, command: compute.VmMigrateFinish) -> Done:
        """The guest is this node's now: define a moved stopped guest, publish its state."""
        record = await self._owned(command.vmid)
        self._incoming.pop(command.vmid, None)
        name = domain_name(command.vmid)
        info = await self.service.hypervisor.info(name)
        if info is None:
            await self.service.define(record)
        elif not command.online and info.state is not PowerState.STOPPED:
            # A stopped guest crossed over paused (to copy its disks): stopped it stays.
            await self.service.hypervisor.stop(name)
            info = None
        state = PowerState.STOPPED if info is None else info.state
        await self.service.state_changed(command.vmid, state, None, None)
        await self._confirm_claim(command)
        return Done()

    async def _confirm_claim(self, command: compute.VmMigrateFinish) -> None:
        """Keep the room the scheduler reserved here; one that cannot be confirmed is logged."""
        client = self.service.claim_client
        if client is None or command.claim_id is None:
            return
        try:
            await client.confirm(command.claim_id, command.claim_token, command.vmid)
        except RucherError as err:
            log.warning("claim_not_confirmed", claim=command.claim_id, error=err.message)
