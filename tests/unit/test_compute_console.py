"""Console sessions of the agent over fakes: what is refused, and the relay both ways."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from rucher.bus import RucherError
from rucher.bus.bytestream import StreamClosedError
from rucher.compute.console import ConsoleSessions, relay
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType

from .test_compute_service import NODE, InlineTasks, MemoryGuests

SESSION = "ab" * 16


class FakePort:
    """A console that prints ``output`` then ends, recording what was typed."""

    def __init__(self, output: list[bytes]) -> None:
        self.output = asyncio.Queue[bytes]()
        for chunk in output:
            self.output.put_nowait(chunk)
        self.typed: list[bytes] = []
        self.closed = False

    async def read(self) -> bytes:
        return await self.output.get()

    async def write(self, data: bytes) -> None:
        self.typed.append(data)
        if data == b"exit\n":
            self.output.put_nowait(b"")

    async def close(self) -> None:
        self.closed = True


@dataclass
class FakeStream:
    """The gateway's side: sends ``incoming`` once attached, collects what the agent sent."""

    incoming: list[bytes]
    attached: bool = True
    sent: list[bytes] = field(default_factory=list)
    closed: str | None = None

    async def open(self) -> None:
        return None

    async def wait_first(self, timeout: float) -> None:
        if not self.attached:
            raise StreamClosedError("the peer sent nothing")

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def receive(self) -> bytes:
        await asyncio.sleep(0.01)
        if not self.incoming:
            await asyncio.sleep(3600)
        return self.incoming.pop(0)

    async def close(self, reason: str) -> None:
        self.closed = self.closed or reason


@dataclass
class Power:
    state: PowerState = PowerState.RUNNING

    async def power(self, domain: str) -> PowerState:
        return self.state


class Opener:
    def __init__(self, port: FakePort) -> None:
        self.port = port
        self.opened: list[tuple[str, str]] = []

    async def open(self, domain: str, serial: str) -> FakePort:
        self.opened.append((domain, serial))
        return self.port


async def _sessions(config: dict[str, str], *, power: PowerState = PowerState.RUNNING,
                    attached: bool = True):  # fmt: skip
    guests = MemoryGuests()
    await guests.register(guest_type=GuestType.QEMU, node=NODE, config=config, vmid=100, lock=None)
    port = FakePort([b"login: "])
    stream = FakeStream([b"root\n", b"exit\n"], attached=attached)
    tasks = InlineTasks()
    sessions = ConsoleSessions(
        guests, tasks, Opener(port), lambda session: stream, Power(power), node=NODE
    )
    return sessions, tasks, port, stream


def _open(serial: str = "serial0") -> compute.VmConsoleOpen:
    return compute.VmConsoleOpen(vmid=100, user="root@pam", session=SESSION, serial=serial)


async def test_a_session_relays_both_ways_then_ends_its_task():
    sessions, tasks, port, stream = await _sessions({"serial0": "socket"})
    opened = await sessions.open(_open())
    assert opened.upid.startswith(f"UPID:{NODE}:vncproxy:100")
    assert stream.sent == [b"login: "]
    assert port.typed == [b"root\n", b"exit\n"]
    assert tasks.ended == [("vncproxy", "OK")]
    assert port.closed
    assert stream.closed == "console session ended"


async def test_no_client_fails_the_task_and_releases_the_console():
    sessions, tasks, port, _stream = await _sessions({"serial0": "socket"}, attached=False)
    await sessions.open(_open())
    assert tasks.ended[0][1].startswith("no client connected")
    assert port.closed


@pytest.mark.parametrize(
    ("config", "serial", "power", "field"),
    [
        ({}, "serial0", PowerState.RUNNING, "serial0"),
        ({"serial1": "/dev/ttyS1"}, "serial1", PowerState.RUNNING, "serial1"),
        ({"serial0": "socket"}, "serial0", PowerState.STOPPED, "vmid"),
    ],
)
async def test_what_has_no_console_is_refused_naming_the_field(config, serial, power, field):
    sessions, tasks, _port, _stream = await _sessions(config, power=power)
    with pytest.raises(RucherError) as caught:
        await sessions.open(_open(serial))
    assert caught.value.code is ErrorCode.INVALID
    assert caught.value.details["field"] == field
    assert tasks.ended == []


async def test_relay_reports_why_it_ended():
    port = FakePort([b"bye", b""])
    stream = FakeStream([])
    assert await relay(port, stream) == "the guest's console ended"
    assert stream.sent == [b"bye"]
