"""The drivers this node uses, one per storage definition, rebuilt when a definition changes."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import msgspec

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import StorageDefinition, StorageRecord, StorageType
from rucher.storage import drivers, volnames
from rucher.storage.drivers import DriverFactory, NodeContext
from rucher.storage.drivers.interface import StorageDriver
from rucher.storage.ports import DefinitionBook
from rucher.storage.volnames import VolName


def applies_to(definition: StorageDefinition, node: str) -> bool:
    """Whether ``node`` may use the storage (``nodes`` empty: every node)."""
    return not definition.nodes or node in definition.nodes


class DriverPool:
    """Resolves storage ids and volume ids to this node's driver, and serialises changes.

    Changes to one storage run one at a time on this node (Proxmox locks a storage for them
    too); names on shared storage are claimed atomically by the backend, so nodes never clash.
    """

    def __init__(
        self,
        *,
        node: str,
        book: DefinitionBook,
        context: NodeContext,
        registry: dict[StorageType, DriverFactory] | None = None,
    ) -> None:
        self.node = node
        self.book = book
        self.context = context
        self.registry = registry if registry is not None else drivers.REGISTRY
        self._drivers: dict[str, tuple[bytes, StorageDriver]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def lock(self, storage: str) -> asyncio.Lock:
        """The lock serialising changes to ``storage`` on this node."""
        return self._locks[storage]

    async def record(self, storage: str, *, field: str = "storage") -> StorageRecord:
        """A storage's record; ``not_found`` naming ``field`` when it does not exist."""
        record = await self.book.get(storage)
        if record is None:
            raise RucherError(
                ErrorCode.NOT_FOUND,
                f"storage '{storage}' does not exist",
                details={"field": field},
            )
        return record

    async def driver(
        self, storage: str, *, field: str = "storage"
    ) -> tuple[StorageDriver, StorageDefinition]:
        """The driver of an enabled storage this node may use."""
        record = await self.record(storage, field=field)
        definition = record.definition
        if definition.disable:
            raise RucherError(
                ErrorCode.INVALID, f"storage '{storage}' is disabled", details={"field": field}
            )
        if not applies_to(definition, self.node):
            raise RucherError(
                ErrorCode.INVALID,
                f"storage '{storage}' is not available on node '{self.node}'",
                details={"field": field},
            )
        return self.cached(record), definition

    def cached(self, record: StorageRecord) -> StorageDriver:
        """The driver for ``record``, built once per version of the definition."""
        version = msgspec.json.encode(record)
        storage = record.definition.storage
        known = self._drivers.get(storage)
        if known is not None and known[0] == version:
            return known[1]
        driver = drivers.build(record, self.context, self.registry)
        self._drivers[storage] = (version, driver)
        if known is not None:
            task = asyncio.get_running_loop().create_task(known[1].close())
            task.add_done_callback(lambda done: done.exception())
        return driver

    async def volume(
        self, volid: str, *, field: str = "volid"
    ) -> tuple[StorageDriver, StorageDefinition, VolName, str]:
        """Driver, definition, parsed name and volume name of ``STORAGE:VOLNAME``."""
        storage, volname = volnames.split_volid(volid)
        driver, definition = await self.driver(storage, field=field)
        try:
            parsed = volnames.parse(definition.storage_type, volname)
        except RucherError as err:
            raise RucherError(err.code, err.message, details={"field": field}) from err
        return driver, definition, parsed, volname

    def forget(self, volid: str) -> None:
        """Tell the volume's driver, if built, that the volume was freed or renamed."""
        storage, _, volname = volid.partition(":")
        known = self._drivers.get(storage)
        if known is not None and volname:
            try:
                known[1].forget(volname)
            except RucherError:
                return  # a name this storage would not have: nothing cached under it

    async def close(self) -> None:
        """Close every driver."""
        for _, driver in self._drivers.values():
            await driver.close()
        self._drivers.clear()
