"""One declaration per storage subject: the bus decodes, the service answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus
from rucher.proto import storage as subjects
from rucher.proto.base import RpcSubject, Scope
from rucher.storage.adapters import AppliedReplies
from rucher.storage.definitions import Definitions
from rucher.storage.service import StorageService
from rucher.storage.transfer import Transfers

Operation = Callable[[Any], Awaitable[Any]]


def routes(
    storage: StorageService, definitions: Definitions, transfers: Transfers
) -> list[tuple[RpcSubject[Any, Any], Operation, bool]]:
    """Every ``rpc.storage.*`` subject, its operation, and whether repeats get the first reply.

    A repeated command id is answered from the ``idempotency`` bucket instead of running twice;
    task commands need no such record: the task runner answers a repeat with the first UPID.
    """
    return [
        (subjects.DEFINITION_CREATE, definitions.create, True),
        (subjects.DEFINITION_UPDATE, definitions.update, True),
        (subjects.DEFINITION_DELETE, definitions.delete, True),
        (subjects.DEFINITION_LIST, definitions.list, False),
        (subjects.STATUS, storage.status, False),
        (subjects.CONTENT_LIST, storage.content_list, False),
        (subjects.VOLUME_INFO, storage.volume_info, False),
        (subjects.ORPHANS, storage.orphans, False),
        (subjects.VOLUME_ALLOCATE, storage.allocate, True),
        (subjects.VOLUME_FREE, storage.free, True),
        (subjects.VOLUME_RESIZE, storage.resize, True),
        (subjects.VOLUME_UPDATE, storage.update, True),
        (subjects.VOLUME_CLONE, storage.clone, True),
        (subjects.VOLUME_CREATE_BASE, storage.create_base, True),
        (subjects.VOLUME_RENAME, storage.rename, True),
        (subjects.VOLUME_MAP, storage.map, False),
        (subjects.VOLUME_UNMAP, storage.unmap, False),
        (subjects.SNAPSHOT_CREATE, storage.snapshot_create, True),
        (subjects.SNAPSHOT_ROLLBACK, storage.snapshot_rollback, True),
        (subjects.SNAPSHOT_DELETE, storage.snapshot_delete, True),
        (subjects.CONTENT_UPLOAD, transfers.upload, False),
        (subjects.CONTENT_DOWNLOAD, transfers.download, False),
        (subjects.VOLUME_COPY, transfers.copy, False),
    ]


async def serve(
    bus: Bus,
    storage: StorageService,
    definitions: Definitions,
    transfers: Transfers,
    replies: AppliedReplies,
) -> None:
    """Answer every storage subject: cluster-wide ones in the queue group, others for this node."""
    for subject, operation, once in routes(storage, definitions, transfers):
        handler = replies.once(subject, operation) if once else _plain(operation)
        if subject.scope is Scope.NODE:
            await bus.serve(subject, handler, node=bus.node)
        else:
            await bus.serve(subject, handler)


def _plain(operation: Operation) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle
