"""The one exception type that crosses the bus: a structured error with a code."""

from __future__ import annotations

from typing import Any

from rucher.proto.errors import RETRYABLE, ErrorCode, ErrorReply


class RucherError(Exception):
    """An error with a stable code, a readable message and structured details.

    Raised by handlers, it becomes an :class:`ErrorReply` on the wire; received in a reply, it is
    raised again on the caller's side with the same fields.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = code in RETRYABLE if retryable is None else retryable
        self.details = details or {}

    def to_reply(self) -> ErrorReply:
        """The wire form of this error."""
        return ErrorReply(
            code=self.code, message=self.message, retryable=self.retryable, details=self.details
        )

    @classmethod
    def from_reply(cls, reply: ErrorReply) -> RucherError:
        """Rebuild the error a remote handler raised."""
        return cls(reply.code, reply.message, retryable=reply.retryable, details=reply.details)

    def __repr__(self) -> str:
        return f"RucherError({self.code.value!r}, {self.message!r})"
