"""The live round loop and the node shutdown: waiting for the LRM to finish is bounded."""

from __future__ import annotations

import asyncio

import pytest

from rucher.ha.live.rounds import RoundLoop
from rucher.ha.live.settings import LiveSettings
from rucher.ha.service import HaService


class Daemon:
    """Runs ``rounds`` rounds, then exits (never, with None)."""

    def __init__(self, rounds: int | None) -> None:
        self.state = "active"
        self.left = rounds

    def iterate(self, cluster_state_ok: bool = True) -> bool:
        if self.left is None:
            return True
        self.left -= 1
        return self.left > 0


async def test_finished_returns_once_the_daemon_exits():
    loop = RoundLoop("lrm", lambda: Daemon(3), interval=0.02, min_gap=0.0)
    loop.start()
    async with asyncio.timeout(5):
        await loop.finished()
    assert loop.rounds == 3
    await loop.stop()


async def test_a_bounded_wait_for_a_daemon_that_never_exits_leaves_it_running():
    loop = RoundLoop("lrm", lambda: Daemon(None), interval=0.02, min_gap=0.0)
    loop.start()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await loop.finished()
    before = loop.rounds
    await asyncio.sleep(0.1)
    assert loop.rounds > before, "the loop goes on after the wait gave up"
    await loop.stop()


async def test_the_shutdown_policy_is_bounded_and_says_whether_it_finished():
    settings = LiveSettings()
    service = HaService(
        node="n1",
        cache=None,  # type: ignore[arg-type]
        actions=None,  # type: ignore[arg-type]
        epoch=lambda: 1,
        settings=settings,
    )
    assert not await service.shut_down(reboot=False, timeout=0.1), "no LRM: nothing applied"
    service.lrm_loop = RoundLoop("lrm", lambda: Daemon(None), interval=0.02, min_gap=0.0)
    service.lrm_loop.start()
    started = asyncio.get_running_loop().time()
    assert not await service.shut_down(reboot=True, timeout=0.2)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert service.going_down == "reboot"
    await service.lrm_loop.stop()
    service.lrm_loop = RoundLoop("lrm", lambda: Daemon(2), interval=0.02, min_gap=0.0)
    service.lrm_loop.start()
    assert await service.shut_down(reboot=False, timeout=5)
    assert service.going_down == "shutdown"
