"""First start: the pam and pve realms, root@pam, admin@pve with a password, the ticket keys."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path

import structlog

from rucher.bus import RucherError
from rucher.iam.context import Context
from rucher.iam.keys import ensure_keys
from rucher.iam.realms.pve import hash_password
from rucher.proto.common import ChangeKind
from rucher.proto.errors import ErrorCode
from rucher.proto.iam import USER_CHANGED, UserChanged
from rucher.proto.iam_state import (
    AclRecord,
    AclSubjectType,
    RealmRecord,
    RealmType,
    UserRecord,
    acl_key,
    domain_key,
    user_key,
)
from rucher.pve.roles import ADMINISTRATOR, ROOT_USER

log = structlog.get_logger("rucher.iam.bootstrap")

ADMIN_USER = "admin@pve"
BUILTIN_REALMS = (
    RealmRecord(realm="pam", type=RealmType.PAM, comment="Linux PAM standard authentication"),
    RealmRecord(realm="pve", type=RealmType.PVE, comment="Rucher authentication server"),
)


async def _create(create: Awaitable[int]) -> bool:
    try:
        await create
    except RucherError as err:
        if err.code is ErrorCode.EXISTS:
            return False
        raise
    return True


def write_password_once(path: Path, password: str) -> bool:
    """Write ``password`` to ``path`` readable by its owner only, unless the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")
    return True


async def bootstrap(ctx: Context) -> None:
    """Create what a cluster needs before anyone can log in; harmless when it exists."""
    tables = ctx.tables
    for realm in BUILTIN_REALMS:
        await _create(tables.domains.create(domain_key(realm.realm), realm))
    await ensure_keys(tables.keys)
    root = UserRecord(userid=ROOT_USER, comment="system administrator", created=time.time())
    if await _create(tables.users.create(user_key(ROOT_USER), root)):
        await _announce(ctx, ROOT_USER)
    if await tables.users.get(user_key(ADMIN_USER)) is not None:
        return
    generated = ctx.settings.admin_password is None
    password = ctx.settings.admin_password or secrets.token_urlsafe(18)
    admin = UserRecord(
        userid=ADMIN_USER,
        comment="administrator created at bootstrap",
        password_hash=await asyncio.to_thread(hash_password, password),
        created=time.time(),
    )
    if not await _create(tables.users.create(user_key(ADMIN_USER), admin)):
        return  # another instance bootstrapped it at the same moment
    grant = AclRecord(
        path="/", ugid=ADMIN_USER, type=AclSubjectType.USER, roleid=ADMINISTRATOR, propagate=True
    )
    await tables.acl.put(acl_key(grant), grant)
    await _announce(ctx, ADMIN_USER)
    if generated:
        written = write_password_once(ctx.settings.admin_password_file, password)
        log.info(
            "admin_password_generated",
            user=ADMIN_USER,
            file=str(ctx.settings.admin_password_file),
            written=written,
        )


async def _announce(ctx: Context, userid: str) -> None:
    event = UserChanged(userid=userid, change=ChangeKind.CREATED, actor=ROOT_USER, **ctx.meta())
    await ctx.audit.emit(USER_CHANGED, event)
