"""Reconciliation at start: libvirt's domains against this node's guest documents."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from rucher.bus import RucherError
from rucher.compute.domain_xml import domain_name
from rucher.compute.drivers.interface import DomainInfo
from rucher.compute.service import ComputeService, vmids
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.compute import DriftKind
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestLock, GuestRecord, GuestType

log = structlog.get_logger("rucher.compute.reconcile")

Report = Callable[[DriftKind, int, str], Awaitable[None]]
LIVE = frozenset({PowerState.RUNNING, PowerState.PAUSED})
# Where a guest a finished migration moved runs: asked this many times, this far apart.
PROBE_ROUNDS = 3
PROBE_PAUSE = 2.0


class Peers(Protocol):
    """The other nodes' hypervisors, as far as reconciliation asks them."""

    async def nodes(self) -> set[str]:
        """Nodes whose compute agent is registered now."""

    async def probe(self, node: str, vmid: int) -> PowerState | None:
        """``node``'s domain of ``vmid``: its state, None when it has none."""


async def reconcile(
    service: ComputeService, peers: Peers | None = None
) -> list[compute.VmDriftDetected]:
    """Adopt or remove what differs so no domain is left without a document, and report it.

    A Rucher domain whose guest is unknown or owned by another node is a leftover of an
    interrupted create, destroy or migration: it is stopped and undefined. A document of this
    node without a domain gets its domain defined again from the config; one still locked
    ``create`` without a domain is an interrupted create and is removed with the volumes it
    allocated. A guest still locked ``migrate`` is one whose migration this agent drove and
    died in (:func:`_interrupted_migration`). Every guest's state is published so the
    cluster's view starts right.
    """
    hypervisor, guests = service.hypervisor, service.guests
    domains = vmids(await hypervisor.domains())
    records = {
        record.vmid: record
        for record in await guests.list(node=service.node, guest_type=GuestType.QEMU)
    }
    found: list[compute.VmDriftDetected] = []

    async def report(kind: DriftKind, vmid: int, detail: str) -> None:
        event = compute.VmDriftDetected(
            **service.event_fields(), kind=kind, vmid=vmid, domain=domain_name(vmid), detail=detail
        )
        found.append(event)
        log.warning("guest_drift", kind=kind, vmid=vmid, detail=detail)
        await service.events.emit(compute.GUEST_DRIFT_DETECTED, event)

    for vmid, info in sorted(domains.items()):
        if vmid in records:
            continue
        owner = await _owner(service, vmid)
        await hypervisor.stop(info.name)
        await hypervisor.undefine(info.name)
        where = f"owned by node {owner.node}" if owner else "unknown to the guest registry"
        await report(DriftKind.UNKNOWN_DOMAIN, vmid, f"domain {where}: stopped and undefined")
        if (
            owner is not None
            and owner.lock is GuestLock.MIGRATE
            and info.state is PowerState.STOPPED
        ):
            # This node moved it (ownership went over) and died before unlocking it.
            await guests.clear_lock(vmid, GuestLock.MIGRATE)
            await report(DriftKind.ADOPTED, vmid, f"migrated to node {owner.node}: lock cleared")
    for vmid, record in sorted(records.items()):
        if record.lock is GuestLock.MIGRATE:
            await _interrupted_migration(service, record, domains.get(vmid), report, peers)
            continue
        if vmid in domains:
            if record.lock is GuestLock.CREATE:
                await guests.clear_lock(vmid, GuestLock.CREATE)
                await report(DriftKind.ADOPTED, vmid, "interrupted create finished: lock cleared")
            await service.state_changed(vmid, domains[vmid].state, None, None)
            continue
        if record.lock is GuestLock.CREATE:
            await service.free_volumes(vmid, record.config, None)
            await guests.remove(vmid, lock_held=GuestLock.CREATE)
            await report(DriftKind.MISSING_DOMAIN, vmid, "interrupted create undone")
            continue
        try:
            await service.define(record)
        except RucherError as err:
            await report(DriftKind.MISSING_DOMAIN, vmid, f"cannot define domain: {err.message}")
            continue
        await report(DriftKind.ADOPTED, vmid, "domain was missing: defined from the config")
        await service.state_changed(vmid, PowerState.STOPPED, None, None)
    return found


async def _interrupted_migration(
    service: ComputeService,
    record: GuestRecord,
    info: DomainInfo | None,
    report: Report,
    peers: Peers | None,
) -> None:
    """Settle a guest whose migration from this node outlived the agent that drove it.

    Running here, it stays: a migration libvirt still carries on is aborted (the guest runs
    on here, the target's incoming domain goes), and the lock is cleared. Stopped here, it
    moved nothing yet (ownership moves last) and stays, defined again if need be. A guest
    libvirt reports migrated away finished moving while the agent was down: the one peer
    that runs it gets its ownership, as the migration would have given it. If no single
    peer runs it, it keeps its lock, so it is never started twice.
    """
    vmid, hypervisor, name = record.vmid, service.hypervisor, domain_name(record.vmid)
    if info is not None and info.state is not PowerState.STOPPED:
        aborted = await hypervisor.abort_job(name)
        await service.guests.clear_lock(vmid, GuestLock.MIGRATE)
        how = "its migration aborted" if aborted else "it never left"
        await report(DriftKind.ADOPTED, vmid, f"interrupted migration: runs here ({how})")
        await service.state_changed(vmid, await service.power_state(vmid), None, None)
        return
    if info is not None and await hypervisor.migrated_away(name):
        target = await _runs_on(service, peers, vmid)
        if target is not None:
            await service.guests.transfer(
                vmid, from_node=service.node, to_node=target, token=record.owner_token
            )
            await service.guests.clear_lock(vmid, GuestLock.MIGRATE)
            await hypervisor.undefine(name)
            await report(
                DriftKind.ADOPTED,
                vmid,
                f"interrupted migration had finished: the guest runs on node {target}, "
                "which owns it now",
            )
            return
        await report(
            DriftKind.MISSING_DOMAIN,
            vmid,
            "interrupted migration: libvirt moved the guest away, but no single other node "
            "runs it; it stays locked (migrate) so it is not started twice",
        )
        return
    if info is None:
        await service.define(record)
    await service.guests.clear_lock(vmid, GuestLock.MIGRATE)
    await report(DriftKind.ADOPTED, vmid, "interrupted migration: stays here, stopped")
    await service.state_changed(vmid, PowerState.STOPPED, None, None)


async def _runs_on(service: ComputeService, peers: Peers | None, vmid: int) -> str | None:
    """The one other node whose hypervisor runs the guest, if exactly one does.

    Nobody found is asked again a few times: a peer's agent may be restarting too.
    """
    if peers is None:
        return None
    for attempt in range(PROBE_ROUNDS):
        if attempt:
            await asyncio.sleep(PROBE_PAUSE)
        running = []
        for node in sorted(await peers.nodes() - {service.node}):
            state = await peers.probe(node, vmid)
            log.info("peer_probed", vmid=vmid, peer=node, state=state)
            if state in LIVE:
                running.append(node)
        if running:
            return running[0] if len(running) == 1 else None
    return None


async def _owner(service: ComputeService, vmid: int) -> GuestRecord | None:
    try:
        return await service.guests.get(vmid)
    except RucherError as err:
        if err.code is ErrorCode.NOT_FOUND:
            return None
        raise
