"""One request's way through the gateway, the same for every endpoint.

Authenticate (unless the schema opens the endpoint to the world), read and check the parameters
against the endpoint's Proxmox schema, check the schema's permission clause, then call the
route's handler and wrap its answer in the Proxmox envelope. Handlers therefore start with a
known caller and typed parameters, and only map one request to one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rucher.authz import AuthzView
from rucher.bus import Bus, RucherError
from rucher.bus.client import new_id
from rucher.gateway import dialect
from rucher.gateway.auth import Caller, identify
from rucher.gateway.cache import AnswerCache, Stamp
from rucher.gateway.config import GatewaySettings
from rucher.gateway.permissions import forbidden, require
from rucher.gateway.readmodel import ReadModel
from rucher.guests import GuestRegistry
from rucher.proto.base import Command, RpcAddress
from rucher.proto.errors import ErrorCode
from rucher.pve.params import ParamError, Params, defaults, validate
from rucher.pve.schema import ApiSchema, Endpoint
from rucher.tasks import TaskStore

API_PREFIX = "/api2/json"
# How long an IAM change may take to reach this gateway's view before the reply goes out anyway.
VIEW_PATIENCE = 1.0
M = TypeVar("M", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)
_AT_FIELD = re.compile(r"at `\$\.(\w+)")
# Path parameters taken raw, slashes included: volume ids are ``local:100/vm-100-disk-0.qcow2``.
RAW_PATH_PARAMS = ("volume",)
# Endpoints that take a file in a multipart body, by (method, path): the parameter it fills.
FILE_PARAMS: dict[tuple[str, str], str] = {}


class Rebuilds:
    """Signals each rebuild of the IAM view, so a writer can wait for the one after its change."""

    def __init__(self, view: AuthzView) -> None:
        self._next = asyncio.Event()
        view.on_rebuild(self._rebuilt)

    def _rebuilt(self, generation: int) -> None:
        self._next.set()
        self._next = asyncio.Event()

    def next(self) -> asyncio.Event:
        """An event set at the next rebuild."""
        return self._next


@dataclass(frozen=True)
class Gateway:
    """Everything a handler may use: the bus, the IAM view, the read model, stores, settings."""

    bus: Bus
    view: AuthzView
    model: ReadModel
    tasks: TaskStore
    guests: GuestRegistry
    schema: ApiSchema
    settings: GatewaySettings
    version: str
    rebuilds: Rebuilds
    answers: AnswerCache = field(default_factory=AnswerCache)

    def stamp(self) -> Stamp:
        """What cached answers depend on: the read model's version, the IAM view's generation."""
        return (self.model.version, self.view.generation)


@dataclass(frozen=True)
class Call:
    """One authorised request, as a handler sees it."""

    gateway: Gateway
    caller: Caller | None
    params: Params
    request: Request

    @property
    def authid(self) -> str:
        """The authenticated caller's id (every endpoint but world-open ones has one)."""
        if self.caller is None:
            raise RucherError(ErrorCode.UNAUTHENTICATED, "authentication required")
        return self.caller.authid

    @property
    def user(self) -> str:
        """The caller's user (a token's owner for an API token)."""
        if self.caller is None:
            raise RucherError(ErrorCode.UNAUTHENTICATED, "authentication required")
        return self.caller.userid

    def allowed(self, path: str, privs: list[str] | tuple[str, ...], any_: bool = False) -> bool:
        """Whether the caller holds ``privs`` on ``path``."""
        return self.gateway.view.allowed(self.authid, path, privs, any_)

    def command(self, kind: type[M], **fields: Any) -> M:
        """A typed message built from request values, checked as its receiver will decode it.

        Fields left ``None`` take the message's defaults; a command gets a fresh ``command_id``.
        A value the contract refuses is a 400 naming the request parameter it came from.
        """
        values = {name: value for name, value in fields.items() if value is not None}
        if issubclass(kind, Command):
            values.setdefault("command_id", new_id())
        try:
            return msgspec.convert(values, kind)
        except msgspec.ValidationError as err:
            raise ParamError({self._parameter(str(err)): str(err)}) from err

    def _parameter(self, message: str) -> str:
        found = _AT_FIELD.search(message)
        if found is None:
            return "parameters"
        name = found[1]
        dashed = name.replace("_", "-")
        return dashed if dashed in self.params else name

    async def ask(
        self, address: RpcAddress[M, R], message: M, *, timeout: float | None = None
    ) -> R:
        """Send one request to the owning service and return its typed reply."""
        wait = self.gateway.settings.request_timeout if timeout is None else timeout
        return await self.gateway.bus.request(address, message, timeout=wait)

    async def change_iam(
        self, address: RpcAddress[M, R], message: M, *, timeout: float | None = None
    ) -> R:
        """Send one IAM change and return once this gateway's IAM view has rebuilt after it.

        The caller's next request then sees its own change (a new user, an ACL entry), instead
        of racing the few milliseconds the change takes to reach the view.
        """
        rebuilt = self.gateway.rebuilds.next()
        reply = await self.ask(address, message, timeout=timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(VIEW_PATIENCE):
                await rebuilt.wait()
        return reply


Handler = Callable[[Call], Awaitable[Any]]


class RouteTable:
    """The handlers of one area of the API, by ``(method, Proxmox path)``."""

    def __init__(self) -> None:
        self.handlers: dict[tuple[str, str], Handler] = {}

    def __call__(
        self, method: str, path: str, *, file_param: str | None = None
    ) -> Callable[[Handler], Handler]:
        """Declare ``handler`` as the implementation of ``method path``.

        ``file_param`` names the parameter an uploaded file's name fills: the endpoint then
        takes a multipart body whose file the handler streams from ``request.state.upload``.
        """

        def register(handler: Handler) -> Handler:
            if (method, path) in self.handlers:
                raise ValueError(f"{method} {path} declared twice")
            self.handlers[(method, path)] = handler
            if file_param is not None:
                FILE_PARAMS[(method, path)] = file_param
            return handler

        return register


def _authenticate(endpoint: Endpoint, gateway: Gateway, request: Request) -> Caller:
    caller = identify(gateway.view, request)
    if caller is None:
        raise RucherError(ErrorCode.UNAUTHENTICATED, "no ticket or API token")
    request.state.user = caller.authid
    if caller.token and not endpoint.allowtoken:
        raise forbidden("API tokens may not use this endpoint")
    return caller


def build_route(endpoint: Endpoint, handler: Handler, gateway: Gateway) -> Route:
    """The Starlette route serving ``endpoint`` with ``handler``."""
    spec = endpoint.parameters
    # Reads fill in the schema's defaults (paging, filters); writes pass on only what was
    # given, so an update never resets what the caller left out.
    spec_defaults = defaults(spec) if endpoint.method == "GET" else {}
    world = endpoint.permissions.user == "world"
    formats = gateway.schema.formats
    file_param = FILE_PARAMS.get(endpoint.key)
    # Starlette names path parameters as identifiers: ``{pci-id-or-mapping}`` routes as
    # ``{pci_id_or_mapping}`` and gets its Proxmox name back before validation.
    repeatable = frozenset(n for n, p in spec.properties.items() if p.type == "array")
    dashed = {
        n.replace("-", "_"): n for n in re.findall(r"\{([\w-]+)\}", endpoint.path) if "-" in n
    }

    async def serve(request: Request) -> Response:
        if dashed:
            request.scope["path_params"] = {
                dashed.get(name, name): value for name, value in request.path_params.items()
            }
        try:
            caller = None if world else _authenticate(endpoint, gateway, request)
            values = await dialect.request_values(
                request, file_param=file_param, repeatable=repeatable
            )
            params = validate(spec, values, formats=formats, defaults_=spec_defaults)
            require(
                endpoint.permissions,
                gateway.view.index,
                caller.authid if caller else None,
                params,
            )
            data = await handler(Call(gateway, caller, params, request))
            if isinstance(data, Response):
                return data
        except ParamError as err:
            return dialect.from_param_error(err)
        except RucherError as err:
            return dialect.from_error(err)
        except dialect.BodyError as err:
            return err.response()
        return dialect.ok(data)

    path = endpoint.path
    for underscored, name in dashed.items():
        path = path.replace(f"{{{name}}}", f"{{{underscored}}}")
    for name in RAW_PATH_PARAMS:
        path = path.replace(f"{{{name}}}", f"{{{name}:path}}")
    return Route(
        API_PREFIX + path,
        serve,
        methods=[endpoint.method],
        name=f"{endpoint.method} {endpoint.path}",
    )
