"""HA fencing tokens at the agent: a start made under a stale lease epoch is refused.

The HA manager starts an HA guest with the fencing token (epoch) of the target node's lease
(``ha-node:{node}``). If that lease expired in the meantime (the node was cut off and fenced, and
its guests recovered elsewhere), the node holds a new epoch or none, and the start fails with a
readable task error instead of running the guest a second time.
"""

from __future__ import annotations

from typing import Protocol

from rucher.bus import Bus, RucherError
from rucher.leases import check_token, lease_bucket
from rucher.proto import compute
from rucher.proto.errors import ErrorCode
from rucher.proto.keys import make_key


class FenceGuard(Protocol):
    """Checks that a lease holds a given fencing token now."""

    async def check(self, lease: str, epoch: int) -> None:
        """Raise ``stale_token`` unless lease ``lease`` holds ``epoch`` now."""
        ...


class LeaseFence:
    """The fence guard over the lease's bucket (``rucher.leases.check_token``)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def check(self, lease: str, epoch: int) -> None:
        """Raise ``stale_token`` unless lease ``lease`` holds ``epoch`` now."""
        await check_token(self.bus, make_key(lease), epoch, lease_bucket(lease))


async def require_current_epoch(guard: FenceGuard | None, command: compute.VmStart) -> None:
    """Refuse ``command`` when it carries a fencing epoch its lease no longer holds."""
    if command.fence_epoch is None and command.fence_lease is None:
        return
    if command.fence_epoch is None or command.fence_lease is None:
        field = "fence_epoch" if command.fence_epoch is None else "fence_lease"
        raise RucherError(
            ErrorCode.INVALID,
            "fence_lease and fence_epoch go together",
            details={"field": field},
        )
    if guard is None:
        raise RucherError(ErrorCode.UNSUPPORTED, "this agent cannot check fencing tokens")
    try:
        await guard.check(command.fence_lease, command.fence_epoch)
    except RucherError as err:
        if err.code is not ErrorCode.STALE_TOKEN:
            raise
        current = err.details.get("current") if err.details else None
        raise RucherError(
            ErrorCode.STALE_TOKEN,
            f"VM {command.vmid}: fencing token {command.fence_epoch} of lease "
            f"{command.fence_lease} is stale (current: {current if current else 'none'}); "
            "the guest may have been recovered on another node",
            details={
                "lease": command.fence_lease,
                "token": command.fence_epoch,
                "current": current,
            },
        ) from err
