"""The live HA environment reads a guest's owner from the registry's leader, never a stale copy."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any, cast

import pytest

from rucher.bus import RucherError
from rucher.ha.live.env import Bridge, LiveEnv
from rucher.ha.model import ClusterSettings
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestRecord, GuestType
from rucher.proto.ha import HaResource, HaResources


def _guest(vmid: int, node: str) -> GuestRecord:
    return GuestRecord(vmid=vmid, type=GuestType.QEMU, node=node, config={}, digest="x")


class _Cache:
    """The watch's copy: still names the fenced node n1."""

    def resources(self) -> HaResources:
        return HaResources(resources={"vm:100": HaResource(sid="vm:100")})

    def guests(self) -> dict[int, GuestRecord]:
        return {100: _guest(100, "n1")}


class _Actions:
    def __init__(self) -> None:
        self.leader: dict[int, GuestRecord] | None = {100: _guest(100, "n2")}

    async def guest_records(self, vmids: list[int]) -> dict[int, GuestRecord]:
        if self.leader is None:
            raise RucherError(ErrorCode.UNAVAILABLE, "guest 100: no stream leader")
        return {vmid: self.leader[vmid] for vmid in vmids if vmid in self.leader}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    running = asyncio.new_event_loop()
    thread = threading.Thread(target=running.run_forever, daemon=True)
    thread.start()
    yield running
    running.call_soon_threadsafe(running.stop)
    thread.join()
    running.close()


def _env(loop: asyncio.AbstractEventLoop, actions: _Actions) -> LiveEnv:
    return LiveEnv(
        node="n2",
        role="lrm",
        cache=cast(Any, _Cache()),
        actions=cast(Any, actions),
        bridge=Bridge(loop),
        epoch=lambda: 1,
        settings=ClusterSettings(),
        capacity=lambda _node: None,
        stopping=threading.Event(),
    )


def test_the_owner_comes_from_the_registrys_leader(loop: asyncio.AbstractEventLoop) -> None:
    configs = _env(loop, _Actions()).read_service_config()
    assert configs["vm:100"].node == "n2"


def test_an_unanswered_leader_fails_the_round_instead_of_reading_the_watchs_copy(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # The watch's copy may still name the fenced node: an LRM reading it answered "not on this
    # node" for a guest it had just started, and the manager moved the guest away (CI).
    actions = _Actions()
    actions.leader = None
    with pytest.raises(OSError, match="no stream leader"):
        _env(loop, actions).read_service_config()
