"""The scheduler's claims on this node: confirmed once their guest exists, released otherwise.

A create that comes with a claim (the scheduler chose this node and reserved room for the VM)
confirms it when the domain is defined, so the room stays reserved without expiry; a create
that fails releases it at once instead of letting it run out. A destroyed guest releases every
claim it had here. A claim that cannot be confirmed (it expired meanwhile) does not undo the
create: the scheduler counts the guest from its document instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.proto.compute import VmCreate
from rucher.proto.scheduler import CLAIM_CONFIRM, CLAIM_RELEASE, ClaimConfirm, ClaimRelease

log = structlog.get_logger("rucher.compute.claims")

CONFIRM_TIMEOUT = 10.0

Note = Callable[[str], Awaitable[None]]


class ClaimClient(Protocol):
    """The scheduler's claim operations, as this node's agent uses them."""

    async def confirm(self, claim_id: str, claim_token: int, vmid: int) -> None:
        """Keep the claim's room as used by ``vmid``; raises if it expired or was released."""

    async def release(self, claim_id: str, vmid: int, reason: str) -> None:
        """Give the claim's room back (durably: the release is never lost)."""

    async def release_guest(self, vmid: int, reason: str) -> None:
        """Give back every claim ``vmid`` holds on this node."""


class BusClaims:
    """Claims over the bus: ``rpc.scheduler.claim_confirm`` and ``cmd.scheduler.claim_release``."""

    def __init__(self, bus: Bus, timeout: float = CONFIRM_TIMEOUT) -> None:
        self.bus = bus
        self.timeout = timeout

    async def confirm(self, claim_id: str, claim_token: int, vmid: int) -> None:
        """Confirm the claim for this node."""
        command = ClaimConfirm(
            command_id=new_id(),
            claim_id=claim_id,
            claim_token=claim_token,
            node=self.bus.node,
            vmid=vmid,
        )
        await self.bus.request(CLAIM_CONFIRM.address, command, timeout=self.timeout)

    async def release(self, claim_id: str, vmid: int, reason: str) -> None:
        """Queue the claim's release on the command stream."""
        command = ClaimRelease(
            command_id=new_id(), claim_id=claim_id, reason=reason, node=self.bus.node, vmid=vmid
        )
        await self.bus.publish(CLAIM_RELEASE.address, command)

    async def release_guest(self, vmid: int, reason: str) -> None:
        """Queue the release of every claim of ``vmid`` on this node."""
        command = ClaimRelease(
            command_id=new_id(), claim_id="", reason=reason, node=self.bus.node, vmid=vmid
        )
        await self.bus.publish(CLAIM_RELEASE.address, command)


async def confirm_created(client: ClaimClient | None, command: VmCreate, note: Note) -> None:
    """Confirm the create's claim; one that cannot be confirmed is noted, not fatal."""
    if client is None or command.claim_id is None:
        return
    try:
        await client.confirm(command.claim_id, command.claim_token, command.vmid)
    except RucherError as err:
        log.warning(
            "claim_not_confirmed", claim=command.claim_id, vmid=command.vmid, error=err.message
        )
        await note(f"claim {command.claim_id} could not be confirmed: {err.message}")
        return
    await note(f"claim {command.claim_id} confirmed")


def release_failed(client: ClaimClient | None, command: VmCreate) -> Callable[[], Awaitable[None]]:
    """An undo step giving the create's claim back."""

    async def release() -> None:
        if client is not None and command.claim_id is not None:
            await client.release(command.claim_id, command.vmid, "create failed")

    return release


async def release_destroyed(client: ClaimClient | None, vmid: int) -> None:
    """Give back the claims of a destroyed guest; a lost release is logged (the reaper ends it)."""
    if client is None:
        return
    try:
        await client.release_guest(vmid, "guest destroyed")
    except RucherError as err:
        log.warning("claim_release_lost", vmid=vmid, error=err.message)
