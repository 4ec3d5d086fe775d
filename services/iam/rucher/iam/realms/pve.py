"""The ``pve`` realm: Rucher's own users, with argon2id password hashes in their records."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from rucher.proto.iam_state import UserRecord

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_hash_memory_to_the_os() -> None:
    """Make glibc serve argon2's working memory by mmap, so it is returned after each hash.

    By default glibc raises its mmap threshold to the size of the last mmapped block freed
    (up to 32 MiB), after which each hash's 19 MiB stays in the heap: 19 MiB more RSS at idle.
    Setting the threshold explicitly turns that adjustment off. Other C libraries: no change.
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


_return_hash_memory_to_the_os()
# OWASP's argon2id profile (19 MiB, 2 passes, 1 lane) rather than RFC 9106's 64 MiB one: every
# login in flight holds this much memory, and the service must stay small even under a burst of
# logins. Hashes made with other parameters still verify (they are encoded in the hash).
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Checked against when the user has no hash, so a missing user costs as much as a wrong password.
_DUMMY_HASH = _HASHER.hash("rucher-no-such-user")


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (encoded, with its salt and parameters)."""
    return _HASHER.hash(password)


def verify_password(encoded: str, password: str) -> bool:
    """Whether ``password`` matches the argon2id hash ``encoded`` (False for no hash)."""
    try:
        return _HASHER.verify(encoded or _DUMMY_HASH, password) and bool(encoded)
    except (VerificationError, InvalidHashError):
        return False


class PveRealm:
    """Passwords checked against the argon2id hash in the user's record."""

    async def authenticate(self, user: UserRecord, password: str) -> bool:
        """Whether ``password`` matches (hashing runs off the event loop)."""
        return await asyncio.to_thread(verify_password, user.password_hash, password)
