"""The bus's own contracts: rejected messages, applied-command records, byte-stream frames."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from rucher.proto.base import Event, Kind, Scope, Subject
from rucher.proto.keys import encode_token


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


class ByteFrame(msgspec.Struct, frozen=True, kw_only=True):
    """One frame of an interactive byte stream (a console) on core NATS, never stored.

    ``seq`` counts each side's frames from 1, so the receiver sees a gap and closes the session;
    ``data`` holds at most 64 KiB; ``ack`` grants credit: the total bytes the sender of the frame
    has received so far; ``close`` (a reason) ends the session. A frame without data is a
    heartbeat.
    """

    seq: int
    data: bytes = b""
    ack: int | None = None
    close: str | None = None


@dataclass(frozen=True)
class SessionSubjects:
    """The two core NATS subjects of a kind of byte-stream session, carrying ``ByteFrame``s.

    ``{prefix}.{node}.{session}.out`` flows from the node's service to the caller, ``.in`` back.
    """

    prefix: str
    summary: str

    def out(self, *, node: str, session: str) -> str:
        """The subject the node's service sends on."""
        return f"{self.prefix}.{encode_token(node)}.{encode_token(session)}.out"

    def in_(self, *, node: str, session: str) -> str:
        """The subject the caller sends on."""
        return f"{self.prefix}.{encode_token(node)}.{encode_token(session)}.in"
