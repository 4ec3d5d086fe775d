"""Events about the bus itself: messages a consumer could not use."""

from __future__ import annotations

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject


class MessageRejected(Event, frozen=True, kw_only=True, tag="bus.message_rejected"):
    """A consumer terminated a message it could not decode or handle, with the reason."""

    subject: str
    stream: str
    consumer: str
    stream_seq: int
    reason: str
    service: str


MESSAGE_REJECTED = Subject(
    "evt.bus.message_rejected.{node}",
    MessageRejected,
    Kind.EVENT,
    Scope.NODE,
    "A malformed or unhandleable message was terminated.",
)


class AppliedCommand(msgspec.Struct, frozen=True, kw_only=True):
    """The ``idempotency`` bucket's record that a command id was applied, with its reply.

    Key ``{applier}.{command id}``; ``reply`` holds the encoded reply (a UPID for tasks), so a
    retried command gets the first answer again instead of running twice.
    """

    applier: str
    time: float
    stream_seq: int = 0
    reply: bytes = b""
