"""Reconciliation after the agent died during a migration: one well-defined place per guest."""
# ruff: noqa: F811 - the ``world`` fixture imported from test_compute_service is a parameter here

from __future__ import annotations

from rucher.compute.domain_xml import domain_name
from rucher.compute.reconcile import reconcile
from rucher.proto.common import PowerState
from rucher.proto.compute import DriftKind
from rucher.proto.guest import GuestLock, GuestType

from .test_compute_service import NODE, World, world  # noqa: F401 - fixture

PEER = "n2"


async def guest(world: World, vmid: int, node: str = NODE, state: PowerState | None = None):
    """A guest locked ``migrate``, with a domain here in ``state`` (None: no domain)."""
    await world.guests.register(
        guest_type=GuestType.QEMU,
        node=node,
        config={"memory": "128"},
        vmid=vmid,
        lock=GuestLock.MIGRATE,
    )
    if state is not None:
        await world.hypervisor.define(f"<domain><name>{domain_name(vmid)}</name></domain>")
        world.hypervisor.domains_by_name[domain_name(vmid)].state = state


async def test_a_guest_still_migrating_is_kept_here_running_and_its_migration_aborted(world):
    await guest(world, 400, state=PowerState.RUNNING)
    world.hypervisor.domains_by_name[domain_name(400)].migrating = True
    drift = await reconcile(world.service)
    assert [(event.vmid, event.kind) for event in drift] == [(400, DriftKind.ADOPTED)]
    assert "migration aborted" in drift[0].detail
    assert ("abort_job", domain_name(400)) in world.hypervisor.calls
    assert world.guests.records[400].lock is None
    assert world.hypervisor.domains_by_name[domain_name(400)].state is PowerState.RUNNING
    assert world.hypervisor.domains_by_name[domain_name(400)].migrating is False


async def test_a_running_guest_whose_migration_never_began_is_unlocked(world):
    await guest(world, 401, state=PowerState.PAUSED)
    drift = await reconcile(world.service)
    assert "never left" in drift[0].detail
    assert world.guests.records[401].lock is None


async def test_a_stopped_or_missing_guest_stays_here_stopped_and_unlocked(world):
    await guest(world, 402, state=PowerState.STOPPED)
    await guest(world, 403)
    drift = await reconcile(world.service)
    assert {event.vmid: event.kind for event in drift} == {
        402: DriftKind.ADOPTED,
        403: DriftKind.ADOPTED,
    }
    assert world.guests.records[402].lock is None
    assert world.guests.records[403].lock is None
    assert world.hypervisor.domains_by_name[domain_name(403)].state is PowerState.STOPPED


async def test_a_guest_libvirt_moved_away_keeps_its_lock_so_it_never_runs_twice(world):
    await guest(world, 404, state=PowerState.STOPPED)
    world.hypervisor.domains_by_name[domain_name(404)].migrated = True
    drift = await reconcile(world.service)
    assert [(event.vmid, event.kind) for event in drift] == [(404, DriftKind.MISSING_DOMAIN)]
    assert world.guests.records[404].lock is GuestLock.MIGRATE


async def test_a_guest_whose_ownership_moved_is_undefined_here_and_unlocked(world):
    await guest(world, 405, node=PEER, state=PowerState.STOPPED)
    drift = await reconcile(world.service)
    assert [event.kind for event in drift] == [DriftKind.UNKNOWN_DOMAIN, DriftKind.ADOPTED]
    assert domain_name(405) not in world.hypervisor.domains_by_name
    assert world.guests.records[405].lock is None
    assert world.guests.records[405].node == PEER


async def test_an_incoming_guest_of_another_node_is_removed_but_its_lock_is_the_sources(world):
    await guest(world, 406, node=PEER, state=PowerState.PAUSED)
    drift = await reconcile(world.service)
    assert [event.kind for event in drift] == [DriftKind.UNKNOWN_DOMAIN]
    assert domain_name(406) not in world.hypervisor.domains_by_name
    assert world.guests.records[406].lock is GuestLock.MIGRATE
