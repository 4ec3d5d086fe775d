r"""A VM's serial console through Proxmox's ``termproxy`` and ``vncwebsocket`` endpoints.

``POST .../termproxy`` subscribes to a new console session's output, asks the guest's agent to
open the session (a ``vncproxy`` task), and answers ``{port, ticket, upid, user}``: ``port``
(5900-5999) and ``ticket`` identify the session for ten seconds, once. ``GET .../vncwebsocket``
upgraded to a websocket then checks the caller like every call (ticket cookie or API token), the
``vncticket`` and ``VM.Console``, and speaks termproxy's protocol: the client's first message is
``USER:TICKET\\n`` (answered ``OK``), then ``0:LEN:DATA`` carries input, ``1:COLS:ROWS:`` a
resize (a serial port has no size: ignored) and ``2`` a ping; output goes as binary messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import structlog
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from rucher.bus import RucherError
from rucher.bus.bytestream import ByteStream, StreamClosedError
from rucher.bus.client import new_id
from rucher.gateway.auth import TICKET_COOKIE, TOKEN_SCHEME
from rucher.gateway.routing import API_PREFIX, Call, Gateway, RouteTable
from rucher.proto import compute
from rucher.proto.errors import ErrorCode
from rucher.proto.guest import GuestType

ROUTES = RouteTable()
log = structlog.get_logger("rucher.gateway.console")

PORTS = range(5900, 6000)
TICKET_LIFETIME = 10.0
# Close codes: 1008 policy violation (authentication), 1011 server error, 1000 normal.
POLICY = 1008
CONSOLE_PATH = "/nodes/{node}/qemu/{vmid}/vncwebsocket"


@dataclass
class Pending:
    """A session opened by ``termproxy`` that no websocket has taken yet."""

    ticket: str
    authid: str
    node: str
    vmid: int
    stream: ByteStream
    expires: float


class ConsoleTickets:
    """Pending console sessions by port; each is taken once or expires (its stream closed)."""

    def __init__(self) -> None:
        self.pending: dict[int, Pending] = {}

    async def add(self, authid: str, node: str, vmid: int, stream: ByteStream) -> Pending:
        """Register a session under a free port with a fresh ticket."""
        await self.expire()
        free = [port for port in PORTS if port not in self.pending]
        if not free:
            raise RucherError(ErrorCode.UNAVAILABLE, "too many console sessions are being opened")
        entry = Pending(
            ticket=f"PVEVNC:{secrets.token_urlsafe(32)}",
            authid=authid,
            node=node,
            vmid=vmid,
            stream=stream,
            expires=time.monotonic() + TICKET_LIFETIME,
        )
        self.pending[secrets.choice(free)] = entry
        return entry

    def port_of(self, entry: Pending) -> int:
        """The port an entry was registered under."""
        return next(port for port, found in self.pending.items() if found is entry)

    async def take(self, port: int, ticket: str, authid: str, node: str, vmid: int) -> Pending:
        """The session for ``port`` if every detail matches; it is gone afterwards either way."""
        await self.expire()
        entry = self.pending.get(port)
        if entry is None or not hmac.compare_digest(entry.ticket, ticket):
            raise RucherError(ErrorCode.UNAUTHENTICATED, "invalid vncticket")
        del self.pending[port]
        if (entry.authid, entry.node, entry.vmid) != (authid, node, vmid):
            await entry.stream.close("the vncticket was presented by someone else")
            raise RucherError(ErrorCode.UNAUTHENTICATED, "invalid vncticket")
        return entry

    def valid(self, port: int, ticket: str, authid: str, node: str, vmid: int) -> bool:
        """Whether a pending session matches, without taking it."""
        entry = self.pending.get(port)
        return (
            entry is not None
            and entry.expires >= time.monotonic()
            and hmac.compare_digest(entry.ticket, ticket)
            and (entry.authid, entry.node, entry.vmid) == (authid, node, vmid)
        )

    async def expire(self) -> None:
        """Close the sessions nobody took in time."""
        now = time.monotonic()
        for port, entry in list(self.pending.items()):
            if entry.expires < now:
                del self.pending[port]
                await entry.stream.close("no websocket connected in time")


TICKETS = ConsoleTickets()


def gateway_stream(call_or_gateway: Gateway, node: str, session: str) -> ByteStream:
    """The gateway's end of a session: it reads ``.out`` and sends on ``.in``."""
    bus = call_or_gateway.bus
    return ByteStream(
        bus.nc,
        outgoing=compute.CONSOLE_DATA.in_(node=node, session=session),
        incoming=compute.CONSOLE_DATA.out(node=node, session=session),
    )


@ROUTES("POST", "/nodes/{node}/qemu/{vmid}/termproxy")
async def termproxy(call: Call) -> dict[str, Any]:
    """Open the VM's serial console (``serial``, default ``serial0``) for a websocket."""
    p = call.params
    node, vmid = p["node"], p["vmid"]
    record = await call.gateway.guests.get(vmid)
    if record.node != node or record.type is not GuestType.QEMU:
        raise RucherError(
            ErrorCode.NOT_FOUND,
            f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist",
        )
    session = new_id()
    stream = gateway_stream(call.gateway, node, session)
    await stream.open()
    try:
        opened = await call.ask(
            compute.CONSOLE_OPEN.to(node=node),
            compute.VmConsoleOpen(
                vmid=vmid, user=call.authid, session=session, serial=p["serial"] or "serial0"
            ),
        )
        entry = await TICKETS.add(call.authid, node, vmid, stream)
    except BaseException:
        await stream.close("the console could not be opened")
        raise
    return {
        "port": TICKETS.port_of(entry),
        "ticket": entry.ticket,
        "upid": opened.upid,
        "user": call.authid,
    }


@ROUTES("GET", "/nodes/{node}/qemu/{vmid}/vncwebsocket")
async def vncwebsocket(call: Call) -> dict[str, str]:
    """Without the upgrade, check the vncticket as Proxmox's handler does and answer the port."""
    p = call.params
    if not TICKETS.valid(p["port"], p["vncticket"], call.authid, p["node"], p["vmid"]):
        raise RucherError(
            ErrorCode.INVALID,
            "vncticket: invalid or expired ticket for this port",
            details={"field": "vncticket"},
        )
    return {"port": str(p["port"])}


def websocket_routes(gateway: Gateway) -> list[WebSocketRoute]:
    """The websocket side of ``vncwebsocket``, added beside the HTTP routes."""

    async def endpoint(websocket: WebSocket) -> None:
        await serve_console(gateway, websocket)

    return [WebSocketRoute(API_PREFIX + CONSOLE_PATH, endpoint)]


def _caller(gateway: Gateway, websocket: WebSocket) -> str:
    header = websocket.headers.get("authorization")
    if header is not None and header.lstrip().startswith(TOKEN_SCHEME):
        return gateway.view.verify_api_token(header)
    cookie = websocket.cookies.get(TICKET_COOKIE)
    if not cookie:
        raise RucherError(ErrorCode.UNAUTHENTICATED, "no ticket or API token")
    return gateway.view.verify_ticket(unquote(cookie))


def _query_int(websocket: WebSocket, name: str) -> int:
    raw = websocket.query_params.get(name, "")
    if not raw.isdigit():
        raise RucherError(ErrorCode.INVALID, f"{name}: not an integer", details={"field": name})
    return int(raw)


async def _admit(gateway: Gateway, websocket: WebSocket) -> tuple[str, int, Pending]:
    """The caller, the VMID and the session, once credentials, privilege and ticket check."""
    authid = _caller(gateway, websocket)
    node = websocket.path_params["node"]
    vmid = int(websocket.path_params["vmid"])
    port = _query_int(websocket, "port")
    ticket = websocket.query_params.get("vncticket", "")
    if not gateway.view.allowed(authid, f"/vms/{vmid}", ["VM.Console"]):
        raise RucherError(ErrorCode.FORBIDDEN, f"Permission check failed (/vms/{vmid})")
    return authid, vmid, await TICKETS.take(port, ticket, authid, node, vmid)


async def serve_console(gateway: Gateway, websocket: WebSocket) -> None:
    """Authenticate, take the pending session, then relay until either side ends."""
    try:
        authid, vmid, entry = await _admit(gateway, websocket)
    except (RucherError, ValueError) as err:
        log.info("console_refused", reason=str(err), path=websocket.url.path)
        await websocket.close(code=POLICY)
        return
    protocols = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in protocols else None)
    stream = entry.stream
    try:
        await _handshake(websocket, entry, authid)
        await stream.ping()
        reason = await _relay(websocket, stream)
    except (RucherError, TimeoutError, WebSocketDisconnect, StreamClosedError) as err:
        reason = getattr(err, "message", None) or getattr(err, "reason", None) or repr(err)
    await stream.close(f"websocket closed: {reason}")
    with contextlib.suppress(RuntimeError):
        await websocket.close(code=1000)
    log.info("console_closed", authid=authid, vmid=vmid, reason=reason)


async def _handshake(websocket: WebSocket, entry: Pending, authid: str) -> None:
    """Check the first message, ``USER:TICKET`` and a newline; answer ``OK`` when it matches."""
    first = await asyncio.wait_for(_receive_bytes(websocket), TICKET_LIFETIME)
    user, _, presented = first.decode(errors="replace").rstrip("\n").partition(":")
    if user not in {authid, authid.partition("!")[0]}:
        raise RucherError(ErrorCode.UNAUTHENTICATED, "the first message names another user")
    if not hmac.compare_digest(presented, entry.ticket):
        raise RucherError(ErrorCode.UNAUTHENTICATED, "invalid vncticket")
    await websocket.send_text("OK")


async def _receive_bytes(websocket: WebSocket) -> bytes:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("bytes") is not None:
        return bytes(message["bytes"])
    return str(message.get("text") or "").encode()


class TermproxyParser:
    """Client messages of termproxy's protocol from a byte stream that may split or join them."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """The complete messages so far: ``data`` (bytes), ``resize`` (``COLS:ROWS``), ``ping``."""
        self.buffer += data
        found: list[tuple[str, bytes]] = []
        while self.buffer:
            kind = self.buffer[:1]
            if kind == b"2":
                found.append(("ping", b""))
                self.buffer = self.buffer[1:]
                continue
            if kind == b"0":
                head, sep, rest = self.buffer[2:].partition(b":")
                if not sep:
                    break
                if self.buffer[1:2] != b":" or not head.isdigit():
                    raise RucherError(ErrorCode.INVALID, "malformed termproxy data message")
                size = int(head)
                if len(rest) < size:
                    break
                found.append(("data", rest[:size]))
                self.buffer = rest[size:]
                continue
            if kind == b"1":
                parts = self.buffer.split(b":", 3)
                if len(parts) < 4:
                    break
                if not (parts[1].isdigit() and parts[2].isdigit()):
                    raise RucherError(ErrorCode.INVALID, "malformed termproxy resize message")
                found.append(("resize", parts[1] + b":" + parts[2]))
                self.buffer = parts[3]
                continue
            raise RucherError(ErrorCode.INVALID, f"unknown termproxy message type {kind!r}")
        return found


async def _relay(websocket: WebSocket, stream: ByteStream) -> str:
    async def output() -> str:
        while True:
            await websocket.send_bytes(await stream.receive())

    async def input_() -> str:
        parser = TermproxyParser()
        while True:
            for kind, payload in parser.feed(await _receive_bytes(websocket)):
                if kind == "data":
                    await stream.send(payload)

    tasks = [asyncio.create_task(output()), asyncio.create_task(input_())]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    error = done.pop().exception()
    if isinstance(error, StreamClosedError):
        return error.reason
    if isinstance(error, WebSocketDisconnect):
        return f"client disconnected ({error.code})"
    if isinstance(error, RucherError):
        return error.message
    return repr(error)
