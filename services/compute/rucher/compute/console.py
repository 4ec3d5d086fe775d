"""Serial console sessions: a running guest's console relayed over the bus, one task each.

``open`` checks the guest (owned here, running, its ``serialN`` set to ``socket``), opens the
console through the :class:`ConsoleOpener` and a byte stream to the caller, then runs a
``vncproxy`` task (Proxmox's name for console tasks) that relays both ways until either side
ends. The gateway must send its first frame within ``attach_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

import structlog

from rucher.bus import RucherError
from rucher.bus.bytestream import StreamClosedError
from rucher.compute.domain_xml import domain_name
from rucher.compute.ports import GuestStore, TaskLog, TaskSubmitter
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType

log = structlog.get_logger("rucher.compute.console")

ATTACH_TIMEOUT = 10.0


class ConsolePort(Protocol):
    """An open console of a guest (a libvirt console stream)."""

    async def read(self) -> bytes:
        """The next output; ``b""`` when the console ended."""

    async def write(self, data: bytes) -> None:
        """Type input."""

    async def close(self) -> None:
        """Let go of the console."""


class ConsoleOpener(Protocol):
    """Opens consoles of this node's domains."""

    async def open(self, domain: str, serial: str) -> ConsolePort:
        """Open ``serial`` of running ``domain``."""


class Stream(Protocol):
    """The caller's end of a session (``rucher.bus.bytestream.ByteStream``)."""

    closed: str | None

    async def open(self) -> None:
        """Start receiving."""

    async def wait_first(self, timeout: float) -> None:
        """Wait for the peer's first frame."""

    async def send(self, data: bytes) -> None:
        """Send bytes."""

    async def receive(self) -> bytes:
        """Receive bytes."""

    async def close(self, reason: str) -> None:
        """End the session."""


class PowerProbe(Protocol):
    """Tells whether a domain runs."""

    async def power(self, domain: str) -> PowerState:
        """The domain's state."""


StreamFactory = Callable[[str], Stream]


class ConsoleSessions:
    """This node's console sessions."""

    def __init__(
        self,
        guests: GuestStore,
        tasks: TaskSubmitter,
        opener: ConsoleOpener,
        streams: StreamFactory,
        power: PowerProbe,
        *,
        node: str,
        attach_timeout: float = ATTACH_TIMEOUT,
    ) -> None:
        self.guests = guests
        self.tasks = tasks
        self.opener = opener
        self.streams = streams
        self.power = power
        self.node = node
        self.attach_timeout = attach_timeout

    async def open(self, query: compute.VmConsoleOpen) -> compute.ConsoleOpened:
        """Open the console of ``query.vmid`` and start relaying it in a task."""
        record = await self.guests.get(query.vmid)
        if record.node != self.node or record.type is not GuestType.QEMU:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"Configuration file 'nodes/{self.node}/qemu-server/{query.vmid}.conf' "
                "does not exist",
            )
        if record.config.get(query.serial) != "socket":
            raise RucherError(
                ErrorCode.INVALID,
                f"VM {query.vmid}: {query.serial} is not a socket serial port "
                f"(set {query.serial}: socket)",
                details={"field": query.serial},
            )
        name = domain_name(query.vmid)
        if await self.power.power(name) is PowerState.STOPPED:
            raise RucherError(
                ErrorCode.INVALID, f"VM {query.vmid} not running", details={"field": "vmid"}
            )
        port = await self.opener.open(name, query.serial)
        stream = self.streams(query.session)
        try:
            await stream.open()
        except BaseException:
            await port.close()
            raise

        async def body(task: TaskLog) -> None:
            try:
                await task.log(f"console of VM {query.vmid} ({query.serial}) opened")
                try:
                    await stream.wait_first(self.attach_timeout)
                except StreamClosedError as err:
                    raise RucherError(
                        ErrorCode.TIMEOUT, f"no client connected: {err.reason}"
                    ) from err
                reason = await relay(port, stream)
                await task.log(f"console closed: {reason}")
            finally:
                await port.close()
                await stream.close("console session ended")

        try:
            upid = await self.tasks.submit(
                task_type="vncproxy", task_id=str(query.vmid), user=query.user, body=body
            )
        except BaseException:
            await port.close()
            await stream.close("console task not started")
            raise
        return compute.ConsoleOpened(vmid=query.vmid, session=query.session, upid=upid)


async def relay(port: ConsolePort, stream: Stream) -> str:
    """Copy console output to the stream and stream input to the console until one ends."""

    async def output() -> str:
        while True:
            data = await port.read()
            if not data:
                return "the guest's console ended"
            await stream.send(data)

    async def input_() -> str:
        while True:
            await port.write(await stream.receive())

    tasks = [asyncio.create_task(output()), asyncio.create_task(input_())]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, StreamClosedError, RucherError):
                await task
    finished = done.pop()
    error = finished.exception()
    if isinstance(error, StreamClosedError):
        return error.reason
    if isinstance(error, RucherError):
        return error.message
    if error is not None:
        raise error
    return finished.result()
