"""Storage definitions, cluster-wide (Proxmox ``storage.cfg``): checks, digests and changes.

A ``dir`` storage has a ``path`` (the built-in ``local`` may leave it out: each node then uses its
own ``RUCHER_STORAGE_LOCAL_PATH``); an ``rbd`` storage has monitors, a pool, a user and a cephx
secret, is always shared, and holds disks only. Writes are compare-and-set; ``digest`` is Proxmox's
guard against overwriting a change made meanwhile.
"""

from __future__ import annotations

import hashlib
import time

import msgspec
from msgspec.structs import replace

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.proto.common import ChangeKind, Done
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    DEFINITION_CHANGED,
    ContentType,
    StorageDefinition,
    StorageDefinitionChanged,
    StorageDefinitionCreate,
    StorageDefinitionDelete,
    StorageDefinitionEntry,
    StorageDefinitionListing,
    StorageDefinitionListQuery,
    StorageDefinitionUpdate,
    StorageRecord,
    StorageType,
)
from rucher.storage.drivers.ceph import bare_key
from rucher.storage.ports import DefinitionBook, EventSink

LOCAL = "local"
ALL_CONTENT = tuple(ContentType)
CONTENT_BY_TYPE: dict[StorageType, frozenset[ContentType]] = {
    StorageType.DIR: frozenset(ContentType),
    StorageType.RBD: frozenset({ContentType.IMAGES, ContentType.ROOTDIR}),
}
DEFAULT_LOCAL = StorageDefinition(
    storage=LOCAL,
    storage_type=StorageType.DIR,
    content=(
        ContentType.IMAGES,
        ContentType.ROOTDIR,
        ContentType.ISO,
        ContentType.VZTMPL,
        ContentType.BACKUP,
        ContentType.SNIPPETS,
    ),
)


def digest(definition: StorageDefinition) -> str:
    """SHA-1 of the definition's canonical JSON, as Proxmox's config ``digest``."""
    return hashlib.sha1(msgspec.json.encode(definition), usedforsecurity=False).hexdigest()


def _invalid(message: str, field: str) -> RucherError:
    return RucherError(ErrorCode.INVALID, message, details={"field": field})


def normalized(definition: StorageDefinition) -> StorageDefinition:
    """Check a definition and bring it to its canonical form; ``invalid`` names the field."""
    kind = definition.storage_type
    content = tuple(c for c in ALL_CONTENT if c in set(definition.content))
    refused = [c.value for c in content if c not in CONTENT_BY_TYPE[kind]]
    if refused:
        raise _invalid(
            f"storage type '{kind}' does not support content type '{refused[0]}'", "content"
        )
    if len(set(definition.nodes)) != len(definition.nodes):
        raise _invalid("a node is listed twice", "nodes")
    nodes = tuple(sorted(definition.nodes))
    if kind is StorageType.DIR:
        for field in ("pool", "username"):
            if getattr(definition, field) is not None:
                raise _invalid(f"'{field}' is not allowed on a dir storage", field)
        if definition.monhost:
            raise _invalid("'monhost' is not allowed on a dir storage", "monhost")
        if definition.path is None and definition.storage != LOCAL:
            raise _invalid("a dir storage needs a path", "path")
        if definition.path is not None and not definition.path.startswith("/"):
            raise _invalid(f"path '{definition.path}' is not absolute", "path")
        path = (definition.path.rstrip("/") or "/") if definition.path else None
        return replace(definition, content=content, nodes=nodes, path=path)
    if definition.path is not None:
        raise _invalid("'path' is not allowed on an rbd storage", "path")
    if not definition.monhost:
        raise _invalid("an rbd storage needs its monitors (monhost)", "monhost")
    return replace(
        definition,
        content=content,
        nodes=nodes,
        shared=True,
        pool=definition.pool or "rbd",
        username=definition.username or "admin",
    )


def _secret(definition: StorageDefinition, keyring: str | None) -> str | None:
    if keyring is None:
        return None
    if definition.storage_type is not StorageType.RBD:
        raise _invalid("'keyring' is only for rbd storages", "keyring")
    key = bare_key(keyring)
    if not key:
        raise _invalid("the keyring holds no key", "keyring")
    return key


class Definitions:
    """The ``rpc.storage.definition_*`` operations over a :class:`DefinitionBook`."""

    def __init__(self, book: DefinitionBook, events: EventSink, node: str) -> None:
        self.book = book
        self.events = events
        self.node = node

    def _changed(self, storage: str, change: ChangeKind, actor: str | None) -> None:
        event = StorageDefinitionChanged(
            event_id=new_id(),
            node=self.node,
            time=time.time(),
            storage=storage,
            change=change,
            actor=actor,
        )
        self.events.emit(DEFINITION_CHANGED.to(node=self.node), event)

    async def create(self, command: StorageDefinitionCreate) -> Done:
        """Add a definition; ``exists`` when the id is taken."""
        definition = normalized(command.definition)
        record = StorageRecord(definition=definition, keyring=_secret(definition, command.keyring))
        try:
            await self.book.create(record)
        except RucherError as err:
            if err.code is ErrorCode.EXISTS:
                raise RucherError(
                    ErrorCode.EXISTS,
                    f"storage ID '{definition.storage}' already defined",
                    details={"field": "storage"},
                ) from err
            raise
        self._changed(definition.storage, ChangeKind.CREATED, command.user)
        return Done()

    async def update(self, command: StorageDefinitionUpdate) -> Done:
        """Replace a definition (its type never changes), guarded by ``digest`` when given."""
        definition = normalized(command.definition)
        secret = _secret(definition, command.keyring)

        def change(current: StorageRecord) -> StorageRecord:
            if command.digest is not None and command.digest != digest(current.definition):
                raise RucherError(
                    ErrorCode.CONFLICT,
                    "detected modified configuration - file changed by other user? Try again.",
                    details={"field": "digest"},
                )
            if current.definition.storage_type is not definition.storage_type:
                raise _invalid("the type of a storage cannot change", "storage_type")
            keyring = secret if secret is not None else current.keyring
            return StorageRecord(definition=definition, keyring=keyring)

        await self.book.replace(definition.storage, change)
        self._changed(definition.storage, ChangeKind.UPDATED, command.user)
        return Done()

    async def delete(self, command: StorageDefinitionDelete) -> Done:
        """Remove a definition; its volumes stay where they are."""
        await self.book.delete(command.storage)
        self._changed(command.storage, ChangeKind.DELETED, command.user)
        return Done()

    async def list(self, query: StorageDefinitionListQuery) -> StorageDefinitionListing:
        """Definitions with their digests (never the secrets)."""
        entries = [
            StorageDefinitionEntry(definition=record.definition, digest=digest(record.definition))
            for record in await self.book.all()
            if (query.storage is None or record.definition.storage == query.storage)
            and (query.storage_type is None or record.definition.storage_type is query.storage_type)
        ]
        if query.storage is not None and not entries:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"storage '{query.storage}' does not exist",
                details={"field": "storage"},
            )
        return StorageDefinitionListing(definitions=tuple(entries))

    async def ensure(
        self, definition: StorageDefinition, keyring: str | None = None, *, overwrite: bool = False
    ) -> bool:
        """Make sure a definition exists (the default ``local``; with ``overwrite``, a node's Ceph).

        Creates it when absent; with ``overwrite`` also replaces one that differs. Returns whether
        anything changed.
        """
        wanted = StorageRecord(definition=normalized(definition), keyring=keyring)
        current = await self.book.get(definition.storage)
        if current == wanted or (current is not None and not overwrite):
            return False
        if current is None:
            try:
                await self.book.create(wanted)
            except RucherError as err:
                if err.code is not ErrorCode.EXISTS:
                    raise
                return False  # another node made it first
            self._changed(definition.storage, ChangeKind.CREATED, None)
            return True
        await self.book.replace(definition.storage, lambda _: wanted)
        self._changed(definition.storage, ChangeKind.UPDATED, None)
        return True
