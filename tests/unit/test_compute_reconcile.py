"""Reconciliation after the agent died during a migration: one well-defined place per guest."""
# ruff: noqa: F811 - the ``world`` fixture imported from test_compute_service is a parameter here

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import msgspec
import pytest

from rucher.compute import reconcile as reconcile_module
from rucher.compute.domain_xml import domain_name
from rucher.compute.reconcile import reconcile
from rucher.proto.common import PowerState
from rucher.proto.compute import DriftKind
from rucher.proto.guest import GuestLock, GuestRecord, GuestType

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


@dataclass
class FakePeers:
    """Other nodes' domains: node → vmid → state."""

    domains: dict[str, dict[int, PowerState]] = field(default_factory=dict)

    async def nodes(self) -> set[str]:
        return {NODE, *self.domains}

    async def probe(self, node: str, vmid: int) -> PowerState | None:
        assert node != NODE, "a node does not probe itself"
        return self.domains[node].get(vmid)


async def transfer(
    guests, vmid: int, *, from_node: str, to_node: str, token: int = 0
) -> GuestRecord:
    record = guests.records[vmid]
    assert record.node == from_node and record.owner_token == token
    guests.records[vmid] = msgspec.structs.replace(record, node=to_node)
    return guests.records[vmid]


async def test_a_guest_libvirt_moved_to_one_peer_belongs_to_that_peer(world):
    world.guests.transfer = functools.partial(transfer, world.guests)
    await guest(world, 404, state=PowerState.STOPPED)
    world.hypervisor.domains_by_name[domain_name(404)].migrated = True
    peers = FakePeers({PEER: {404: PowerState.RUNNING}, "n3": {}})
    drift = await reconcile(world.service, peers)
    assert [(event.vmid, event.kind) for event in drift] == [(404, DriftKind.ADOPTED)]
    assert f"runs on node {PEER}" in drift[0].detail
    record = world.guests.records[404]
    assert (record.node, record.lock) == (PEER, None)
    assert domain_name(404) not in world.hypervisor.domains_by_name


@pytest.mark.parametrize(
    "peers",
    [
        None,
        FakePeers({PEER: {}}),
        FakePeers({PEER: {404: PowerState.STOPPED}}),
        FakePeers({PEER: {404: PowerState.RUNNING}, "n3": {404: PowerState.RUNNING}}),
    ],
)
async def test_a_guest_moved_away_but_not_found_running_once_keeps_its_lock(
    world, peers, monkeypatch
):
    monkeypatch.setattr(reconcile_module, "PROBE_PAUSE", 0.0)
    await guest(world, 404, state=PowerState.STOPPED)
    world.hypervisor.domains_by_name[domain_name(404)].migrated = True
    drift = await reconcile(world.service, peers)
    assert [(event.vmid, event.kind) for event in drift] == [(404, DriftKind.MISSING_DOMAIN)]
    assert world.guests.records[404].lock is GuestLock.MIGRATE
    assert world.guests.records[404].node == NODE


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


async def test_a_peer_that_answers_late_is_still_found(world, monkeypatch):
    monkeypatch.setattr(reconcile_module, "PROBE_PAUSE", 0.0)
    world.guests.transfer = functools.partial(transfer, world.guests)
    await guest(world, 404, state=PowerState.STOPPED)
    world.hypervisor.domains_by_name[domain_name(404)].migrated = True

    @dataclass
    class Restarting(FakePeers):
        rounds: int = 0

        async def nodes(self) -> set[str]:
            self.rounds += 1
            return {NODE} if self.rounds == 1 else {NODE, PEER}

    await reconcile(world.service, Restarting({PEER: {404: PowerState.RUNNING}}))
    assert world.guests.records[404].node == PEER
