"""Serial consoles of libvirt domains as non-blocking virStreams, relayed into asyncio.

libvirt delivers stream events only through a registered event loop: this module registers
libvirt's default implementation once and runs it on a daemon thread, then opens its own
connection (a connection opened before the registration would never see stream events). Stream
callbacks run on that thread and hand bytes to the asyncio loop; writes and closes run in
``asyncio.to_thread``, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import libvirt  # type: ignore[import-untyped]
import structlog

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode

log = structlog.get_logger("rucher.compute.console")

READ_SIZE = 64 * 1024
# Output the relay has not taken yet; past it the guest is paused by not reading (flow control).
BUFFER_LIMIT = 1024 * 1024
_EVENTS = (
    libvirt.VIR_STREAM_EVENT_READABLE
    | libvirt.VIR_STREAM_EVENT_ERROR
    | libvirt.VIR_STREAM_EVENT_HANGUP
)

_loop_lock = threading.Lock()
_loop_started: list[bool] = []


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it on a daemon thread (once a process)."""
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError as err:
                    log.warning("libvirt_event_loop_error", error=str(err))

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started.append(True)


class LibvirtConsolePort:
    """One open console stream: ``read`` output, ``write`` input, ``close``."""

    def __init__(self, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._buffered = 0
        self._lock = threading.Lock()
        self._paused = False
        self._closed = False

    def start(self) -> None:
        """Start watching the stream (called on the opener's thread)."""
        self._stream.eventAddCallback(_EVENTS, self._on_event, None)

    def _on_event(self, stream: Any, events: int, _opaque: Any) -> None:
        # libvirt's event thread: drain what is readable, hand it to the asyncio loop.
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = stream.recv(READ_SIZE)
                except libvirt.libvirtError as err:
                    self._finish(f"console stream failed: {err.get_error_message()}")
                    return
                if isinstance(data, int):  # -2: nothing more now
                    break
                if not data:
                    self._finish("")
                    return
                self._deliver(data)
                with self._lock:
                    if self._buffered >= BUFFER_LIMIT and not self._paused:
                        self._paused = True
                        stream.eventUpdateCallback(
                            libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
                        )
                        break
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._finish("")

    def _deliver(self, data: bytes) -> None:
        with self._lock:
            self._buffered += len(data)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, data)

    def _finish(self, _reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._loop.call_soon_threadsafe(self._queue.put_nowait, b"")
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()

    async def read(self) -> bytes:
        """The next console output; ``b""`` once the console has ended (guest stopped)."""
        data = await self._queue.get()
        if not data:
            self._queue.put_nowait(b"")  # every later read sees the end too
            return data
        resume = False
        with self._lock:
            self._buffered -= len(data)
            if self._paused and self._buffered < BUFFER_LIMIT // 2 and not self._closed:
                self._paused = False
                resume = True
        if resume:
            await asyncio.to_thread(self._stream.eventUpdateCallback, _EVENTS)
        return data

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the console."""

        def work() -> None:
            view = memoryview(data)
            while view:
                sent = self._stream.send(bytes(view))
                if sent == -2:  # the stream's buffer is full: wait a moment
                    threading.Event().wait(0.01)
                    continue
                view = view[sent:]

        try:
            await asyncio.to_thread(work)
        except libvirt.libvirtError as err:
            raise RucherError(
                ErrorCode.UNAVAILABLE, f"console input failed: {err.get_error_message()}"
            ) from err

    async def close(self) -> None:
        """Stop watching the stream and abort it (the guest keeps running)."""

        def work() -> None:
            with self._lock:
                was_closed, self._closed = self._closed, True
            if not was_closed:
                with contextlib.suppress(libvirt.libvirtError):
                    self._stream.eventRemoveCallback()
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()

        await asyncio.to_thread(work)
        self._queue.put_nowait(b"")


class LibvirtConsoles:
    """Opens serial consoles of one libvirtd's domains."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._connection: Any = None
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        with self._lock:
            if self._connection is None or not self._connection.isAlive():
                ensure_event_loop()
                self._connection = libvirt.open(self.uri)
            return self._connection

    async def open(self, domain: str, serial: str) -> LibvirtConsolePort:
        """Open ``serial`` (``serial0``) of running ``domain``; another client is forced off."""
        loop = asyncio.get_running_loop()

        def work() -> LibvirtConsolePort:
            conn = self._conn()
            guest = conn.lookupByName(domain)
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            guest.openConsole(f"serial{serial.removeprefix('serial')}", stream,
                              libvirt.VIR_DOMAIN_CONSOLE_FORCE)  # fmt: skip
            port = LibvirtConsolePort(stream, loop)
            port.start()
            return port

        try:
            return await asyncio.to_thread(work)
        except libvirt.libvirtError as err:
            code = {
                libvirt.VIR_ERR_NO_DOMAIN: ErrorCode.NOT_FOUND,
                libvirt.VIR_ERR_NO_SUPPORT: ErrorCode.UNSUPPORTED,
            }.get(err.get_error_code(), ErrorCode.INVALID)
            raise RucherError(
                code,
                f"{serial}: cannot open the console: {err.get_error_message()}",
                details={"field": serial} if code is ErrorCode.INVALID else {},
            ) from err
