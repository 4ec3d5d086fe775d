"""Events about the bus itself: messages a consumer could not use."""

from __future__ import annotations

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
