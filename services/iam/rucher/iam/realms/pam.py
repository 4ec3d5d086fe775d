"""The ``pam`` realm: the host's system users, authenticated through PAM (libpam via ctypes)."""

from __future__ import annotations

import asyncio

import pam  # type: ignore[import-untyped]
import structlog

from rucher.proto.iam_state import UserRecord

log = structlog.get_logger("rucher.iam.pam")


def pam_authenticate(service: str, username: str, password: str) -> bool:
    """One PAM conversation: whether ``username``/``password`` pass ``service``'s auth stack."""
    handle = pam.pam()
    try:
        ok = bool(handle.authenticate(username, password, service=service, resetcreds=False))
    except ValueError:  # a NUL byte in the name or password: PAM cannot be asked
        return False
    if not ok:
        log.info("pam_refused", user=username, code=handle.code, reason=handle.reason)
    return ok


class PamRealm:
    """Passwords checked by PAM for the system user named before ``@pam``.

    A missing ``/etc/pam.d/{service}`` makes PAM use its ``other`` stack, which on Debian is the
    common one (pam_unix against /etc/shadow).
    """

    def __init__(self, service: str) -> None:
        self.service = service

    async def authenticate(self, user: UserRecord, password: str) -> bool:
        """Whether PAM accepts the password (PAM blocks: it runs in a thread)."""
        name = user.userid.rsplit("@", 1)[0]
        return await asyncio.to_thread(pam_authenticate, self.service, name, password)
