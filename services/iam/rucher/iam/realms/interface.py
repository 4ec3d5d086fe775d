"""What a password realm offers: check a user's password, and (pve only) store one."""

from __future__ import annotations

from typing import Protocol

from rucher.proto.iam_state import UserRecord


class PasswordRealm(Protocol):
    """A realm users log in to with a password."""

    async def authenticate(self, user: UserRecord, password: str) -> bool:
        """Whether ``password`` is ``user``'s password in this realm."""
        ...
