"""Base message classes and typed subjects shared by every bounded context."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Generic, TypeVar

import msgspec

from rucher.proto.keys import encode_token


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every message on the bus: frozen, keyword-only, tagged with its dotted type name.

    Subclasses set their tag explicitly (``tag="compute.guest.start"``) so the wire name never
    depends on a Python class name.
    """


class Command(Message, frozen=True, kw_only=True):
    """An imperative request. ``command_id`` makes redelivery and retries idempotent."""

    command_id: str


class Event(Message, frozen=True, kw_only=True):
    """Something that happened, in the past tense. ``event_id`` de-duplicates republishing."""

    event_id: str
    node: str
    time: float


class Reply(Message, frozen=True, kw_only=True):
    """A successful answer to a command or query."""


class Kind(StrEnum):
    """How a subject travels: core request/reply, the durable command stream, or events."""

    RPC = "rpc"
    COMMAND = "cmd"
    EVENT = "evt"
    TASKLOG = "tasklog"


class Scope(StrEnum):
    """Who a subject is addressed to: any instance in the cluster, or one node's agent."""

    CLUSTER = "cluster"
    NODE = "node"


T = TypeVar("T", bound=msgspec.Struct)
R = TypeVar("R", bound=msgspec.Struct)

_PARAM = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Subject(Generic[T]):
    """A subject pattern bound to its payload type, so publishing the wrong type is a type error.

    ``pattern`` uses ``{param}`` placeholders for variable tokens
    (``evt.compute.guest.started.{node}``); :meth:`to` fills them and :meth:`wildcard`
    replaces them with ``*`` for subscriptions.
    """

    pattern: str
    payload: type[T]
    kind: Kind
    scope: Scope
    summary: str
    params: tuple[str, ...] = field(init=False)

    registry: ClassVar[dict[str, Subject[msgspec.Struct]]] = {}

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(_PARAM.findall(self.pattern)))
        if not self.pattern.startswith(f"{self.kind.value}."):
            raise ValueError(f"subject {self.pattern!r} must start with {self.kind.value!r}")
        if self.scope is Scope.NODE and "node" not in self.params:
            raise ValueError(f"node-scoped subject {self.pattern!r} lacks a {{node}} token")
        if self.pattern in Subject.registry:
            raise ValueError(f"subject {self.pattern!r} defined twice")
        Subject.registry[self.pattern] = self  # type: ignore[assignment]

    def to(self, **params: str) -> Address[T]:
        """The concrete subject for these parameters (raw ids, encoded as key tokens)."""
        missing = set(self.params) - params.keys()
        if missing:
            raise ValueError(f"subject {self.pattern!r} needs {sorted(missing)}")
        tokens = {name: encode_token(value) for name, value in params.items()}
        return Address(self.pattern.format(**tokens), self)

    def wildcard(self, **params: str) -> str:
        """The pattern with the given parameters filled and the others replaced by ``*``."""
        values = {
            name: encode_token(params[name]) if name in params else "*" for name in self.params
        }
        return self.pattern.format(**values)

    @property
    def address(self) -> Address[T]:
        """The concrete subject of a pattern without parameters."""
        return self.to()


@dataclass(frozen=True)
class RpcSubject(Subject[T], Generic[T, R]):
    """A request/reply subject: the request payload ``T`` and the successful reply type ``R``."""

    reply: type[R] = field(kw_only=True)

    def to(self, **params: str) -> RpcAddress[T, R]:  # type: ignore[override]
        """The concrete subject for these parameters."""
        return RpcAddress(super().to(**params).subject, self)

    @property
    def address(self) -> RpcAddress[T, R]:  # type: ignore[override]
        """The concrete subject of a pattern without parameters."""
        return self.to()


@dataclass(frozen=True)
class Address(Generic[T]):
    """A concrete subject string together with the typed subject it was made from."""

    subject: str
    of: Subject[T]


@dataclass(frozen=True)
class RpcAddress(Generic[T, R]):
    """A concrete request/reply subject with its request and reply types."""

    subject: str
    of: RpcSubject[T, R]
