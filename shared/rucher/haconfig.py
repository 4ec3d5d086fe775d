"""The HA configuration in the cluster store (bucket ``ha``): read, and change by compare-and-set.

Proxmox keeps ``resources.cfg``, ``rules.cfg`` and ``groups.cfg`` as whole files with a SHA-1
``digest``; here each is one document under its own key (``resources``, ``rules``, ``groups``),
with the digest of its canonical encoding. A change reads the document, checks the digest the
caller passed (if any), applies the change and writes it back with compare-and-set on the
revision read, retrying from the read when another writer won without a digest to honour.
``control`` holds the administrator's wishes (armed, maintenance), ``command.{id}`` the queued
migrate/relocate requests, ``manager_status`` the manager's last published status.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from rucher.bus import KV, Bus, Entry, RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.ha import (
    CrmRequest,
    HaControl,
    HaGroups,
    HaResources,
    HaRules,
    ManagerStatus,
)
from rucher.proto.keys import make_key
from rucher.proto.streams import HA

RESOURCES = "resources"
RULES = "rules"
GROUPS = "groups"
CONTROL = "control"
MANAGER_STATUS = "manager_status"
# In the HA service's state folder: the next stop is a reboot, not a shutdown (``ops/down
# --reboot`` writes it); the service takes it at its stop, so it counts once.
REBOOT_FLAG = "ha-reboot"
MODIFIED = "detected modified configuration - file changed by other user? Try again."
ATTEMPTS = 32
BACKOFF = 0.005  # seconds per attempt lost, jittered, so many writers spread out

D = TypeVar("D", bound=msgspec.Struct)
_encoder = msgspec.json.Encoder(order="sorted")


def digest(document: msgspec.Struct) -> str:
    """The SHA-1 of a document's canonical encoding (sorted keys), as Proxmox digests files."""
    return hashlib.sha1(_encoder.encode(document), usedforsecurity=False).hexdigest()


def command_key(request_id: str) -> str:
    """The key of one queued manager request."""
    return make_key("command", request_id)


@dataclass(frozen=True)
class Read(Generic[D]):
    """A document as read: its value (the empty one when absent), digest and revision."""

    value: D
    digest: str
    revision: int


class HaConfigStore:
    """Typed access to the ``ha`` bucket."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.resources_kv: KV[HaResources] = KV(bus, HA, HaResources)
        self.rules_kv: KV[HaRules] = KV(bus, HA, HaRules)
        self.groups_kv: KV[HaGroups] = KV(bus, HA, HaGroups)
        self.control_kv: KV[HaControl] = KV(bus, HA, HaControl)
        self.requests_kv: KV[CrmRequest] = KV(bus, HA, CrmRequest)
        self.status_kv: KV[ManagerStatus] = KV(bus, HA, ManagerStatus)

    @staticmethod
    async def _read(kv: KV[D], key: str, empty: D) -> Read[D]:
        entry: Entry[D] | None = await kv.get(key)
        value = entry.value if entry is not None and entry.value is not None else empty
        return Read(value=value, digest=digest(value), revision=entry.revision if entry else 0)

    async def resources(self) -> Read[HaResources]:
        """The ``resources`` document."""
        return await self._read(self.resources_kv, RESOURCES, HaResources())

    async def rules(self) -> Read[HaRules]:
        """The ``rules`` document."""
        return await self._read(self.rules_kv, RULES, HaRules())

    async def groups(self) -> Read[HaGroups]:
        """The ``groups`` document."""
        return await self._read(self.groups_kv, GROUPS, HaGroups())

    async def control(self) -> Read[HaControl]:
        """The ``control`` document."""
        return await self._read(self.control_kv, CONTROL, HaControl())

    async def manager_status(self) -> ManagerStatus | None:
        """The manager's last published status, or None before any manager ran."""
        entry = await self.status_kv.get(MANAGER_STATUS)
        return entry.value if entry else None

    async def publish_status(self, status: ManagerStatus) -> None:
        """Write the manager's status (only the elected manager does)."""
        await self.status_kv.put(MANAGER_STATUS, status)

    @staticmethod
    async def _change(
        kv: KV[D], key: str, empty: D, change: Callable[[D], D], expected: str | None
    ) -> D:
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, BACKOFF * attempt))  # noqa: S311 - jitter
            current = await HaConfigStore._read(kv, key, empty)
            if expected is not None and expected != current.digest:
                raise RucherError(ErrorCode.CONFLICT, MODIFIED, details={"field": "digest"})
            updated = change(current.value)
            try:
                if current.revision == 0:
                    await kv.create(key, updated)
                else:
                    await kv.update(key, updated, revision=current.revision)
            except RucherError as err:
                if err.code not in (ErrorCode.CONFLICT, ErrorCode.EXISTS):
                    raise
                continue
            return updated
        raise RucherError(ErrorCode.CONFLICT, MODIFIED)

    async def change_resources(
        self, change: Callable[[HaResources], HaResources], digest_: str | None = None
    ) -> HaResources:
        """Apply ``change`` to ``resources`` by compare-and-set (honouring ``digest_``)."""
        return await self._change(self.resources_kv, RESOURCES, HaResources(), change, digest_)

    async def change_rules(
        self, change: Callable[[HaRules], HaRules], digest_: str | None = None
    ) -> HaRules:
        """Apply ``change`` to ``rules`` by compare-and-set (honouring ``digest_``)."""
        return await self._change(self.rules_kv, RULES, HaRules(), change, digest_)

    async def change_groups(
        self, change: Callable[[HaGroups], HaGroups], digest_: str | None = None
    ) -> HaGroups:
        """Apply ``change`` to ``groups`` by compare-and-set (honouring ``digest_``)."""
        return await self._change(self.groups_kv, GROUPS, HaGroups(), change, digest_)

    async def change_control(self, change: Callable[[HaControl], HaControl]) -> HaControl:
        """Apply ``change`` to ``control`` by compare-and-set."""
        return await self._change(self.control_kv, CONTROL, HaControl(), change, None)

    async def queue_request(self, request: CrmRequest) -> None:
        """Queue a migrate/relocate request for the manager."""
        await self.requests_kv.create(command_key(request.id), request)

    async def requests(self) -> list[CrmRequest]:
        """Queued requests, oldest first."""
        entries = await self.requests_kv.entries(make_key("command") + ".>")
        found = [entry.value for entry in entries if entry.value is not None]
        return sorted(found, key=lambda request: request.time)

    async def take_request(self, request: CrmRequest) -> None:
        """Remove a request the manager has read."""
        await self.requests_kv.delete(command_key(request.id))
