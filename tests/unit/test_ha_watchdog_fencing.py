"""The compute agent's fencing-token check on HA starts (rucher.compute.fencing)."""

from __future__ import annotations

import pytest

from rucher.bus import RucherError
from rucher.compute.fencing import require_current_epoch
from rucher.proto import compute
from rucher.proto.errors import ErrorCode


class Tokens:
    """Leases and their current tokens, in memory."""

    def __init__(self, **held: int) -> None:
        self.held = held

    async def check(self, lease: str, epoch: int) -> None:
        current = self.held.get(lease)
        if current != epoch:
            raise RucherError(
                ErrorCode.STALE_TOKEN, "stale", details={"key": lease, "current": current}
            )


def start(**fields) -> compute.VmStart:
    return compute.VmStart(command_id="c1", vmid=100, user="root@pam", **fields)


async def test_a_start_without_epoch_is_not_checked():
    await require_current_epoch(None, start())


async def test_the_current_epoch_passes():
    await require_current_epoch(Tokens(n1=7), start(fence_lease="n1", fence_epoch=7))


async def test_a_stale_epoch_is_refused_readably():
    with pytest.raises(RucherError) as caught:
        await require_current_epoch(Tokens(n1=9), start(fence_lease="n1", fence_epoch=7))
    assert caught.value.code is ErrorCode.STALE_TOKEN
    assert "VM 100: fencing token 7 of lease n1 is stale (current: 9)" in caught.value.message
    assert caught.value.details["current"] == 9


async def test_an_epoch_on_a_lease_nobody_holds_is_refused():
    with pytest.raises(RucherError, match=r"current: none") as caught:
        await require_current_epoch(Tokens(), start(fence_lease="n1", fence_epoch=7))
    assert caught.value.code is ErrorCode.STALE_TOKEN


async def test_half_a_fence_names_the_missing_field():
    with pytest.raises(RucherError) as caught:
        await require_current_epoch(Tokens(), start(fence_lease="n1"))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details == {"field": "fence_epoch"}


async def test_an_agent_without_a_guard_refuses_fenced_starts():
    with pytest.raises(RucherError) as caught:
        await require_current_epoch(None, start(fence_lease="n1", fence_epoch=1))
    assert caught.value.code is ErrorCode.UNSUPPORTED
