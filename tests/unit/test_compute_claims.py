"""The compute agent and claims: confirmed on create, released on failure or destroy."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest

from rucher.bus import RucherError
from rucher.compute.domain_xml import HostFacts
from rucher.compute.drivers.fake import FakeHypervisor
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.errors import ErrorCode

from .test_compute_service import (
    NODE,
    USER,
    Events,
    FakeVolumes,
    InlineTasks,
    MemoryGuests,
    create,
)


@dataclass
class RecordingClaims:
    """The claim client's calls, in order; ``refuse_confirm`` makes confirmations fail."""

    calls: list[tuple[str, ...]] = field(default_factory=list)
    refuse_confirm: str | None = None

    async def confirm(self, claim_id: str, claim_token: int, vmid: int) -> None:
        self.calls.append(("confirm", claim_id, str(claim_token), str(vmid)))
        if self.refuse_confirm:
            raise RucherError(ErrorCode.NOT_FOUND, self.refuse_confirm)

    async def release(self, claim_id: str, vmid: int, reason: str) -> None:
        self.calls.append(("release", claim_id, str(vmid), reason))

    async def release_guest(self, vmid: int, reason: str) -> None:
        self.calls.append(("release_guest", str(vmid), reason))


@dataclass
class Agent:
    service: ComputeService
    claims: RecordingClaims
    tasks: InlineTasks
    hypervisor: FakeHypervisor


@pytest.fixture
def agent() -> Agent:
    claims, tasks, hypervisor = RecordingClaims(), InlineTasks(), FakeHypervisor()
    service = ComputeService(
        hypervisor,
        MemoryGuests(),
        tasks,
        Events(),
        volumes=FakeVolumes(),
        node=NODE,
        facts=HostFacts(),
        shutdown_timeout=0.3,
        claim_client=claims,
    )
    return Agent(service, claims, tasks, hypervisor)


def claimed(vmid: int = 100, **config: str) -> compute.VmCreate:
    return msgspec.structs.replace(create(vmid, **config), claim_id="c-1", claim_token=42)


async def test_a_create_confirms_its_claim_once_the_vm_is_defined(agent):
    await agent.service.create(claimed())
    assert agent.tasks.ended == [("qmcreate", "OK")]
    assert agent.claims.calls == [("confirm", "c-1", "42", "100")]
    assert agent.hypervisor.domains_by_name


async def test_a_create_without_a_claim_touches_no_claim(agent):
    await agent.service.create(create())
    assert agent.tasks.ended == [("qmcreate", "OK")]
    assert agent.claims.calls == []


async def test_a_create_that_fails_releases_its_claim_and_confirms_nothing(agent):
    await agent.service.create(claimed(scsi0="nosuch:1"))
    assert agent.tasks.ended == [("qmcreate", "storage 'nosuch' does not exist")]
    assert agent.claims.calls == [("release", "c-1", "100", "create failed")]
    assert not agent.hypervisor.domains_by_name


async def test_a_claim_that_cannot_be_confirmed_does_not_undo_the_vm(agent):
    agent.claims.refuse_confirm = "claim c-1 expired"
    await agent.service.create(claimed())
    assert agent.tasks.ended == [("qmcreate", "OK")]
    assert agent.hypervisor.domains_by_name


async def test_destroying_a_guest_releases_its_claims_on_the_node(agent):
    await agent.service.create(claimed())
    await agent.service.destroy(compute.VmDestroy(command_id="d", vmid=100, user=USER, purge=True))
    assert agent.tasks.ended == [("qmcreate", "OK"), ("qmdestroy", "OK")]
    assert agent.claims.calls[-1] == ("release_guest", "100", "guest destroyed")
