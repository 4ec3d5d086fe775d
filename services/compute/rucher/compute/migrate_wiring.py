"""Composition of the agent's migrations (called by ``__main__``): peers over the bus, subjects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus, RucherError
from rucher.compute.config import ComputeSettings
from rucher.compute.migrate import Migrator
from rucher.compute.service import ComputeService
from rucher.guests import GuestRegistry
from rucher.proto import compute, storage
from rucher.registry import ServiceRegistry
from rucher.service import ServiceContext

# Preparing renders the domain and maps every disk through the target's storage service.
PEER_TIMEOUT = 60.0
# A node's storage service answers its status from its definitions and a quick look at each.
STORAGE_TIMEOUT = 10.0


class BusPeers:
    """Other nodes' compute agents over the bus; the registry says which nodes have one."""

    def __init__(self, bus: Bus, registry: ServiceRegistry, timeout: float = PEER_TIMEOUT) -> None:
        self.bus = bus
        self.registry = registry
        self.timeout = timeout

    async def nodes(self) -> set[str]:
        """Nodes whose compute agent is registered now."""
        return {instance.node for instance in await self.registry.instances("compute")}

    async def prepare(self, node: str, command: compute.VmMigratePrepare) -> compute.VmMigrateReady:
        """Ask ``node`` to get ready to receive a guest."""
        return await self.bus.request(
            compute.GUEST_MIGRATE_PREPARE.to(node=node), command, timeout=self.timeout
        )

    async def finish(self, node: str, command: compute.VmMigrateFinish) -> None:
        """Tell ``node`` the guest is its own now."""
        await self.bus.request(
            compute.GUEST_MIGRATE_FINISH.to(node=node), command, timeout=self.timeout
        )

    async def storages(self, node: str) -> set[str] | None:
        """The storages enabled and active on ``node``; None when its storage service is silent."""
        try:
            report = await self.bus.request(
                storage.STATUS.to(node=node),
                storage.StorageStatusQuery(enabled_only=True),
                timeout=STORAGE_TIMEOUT,
            )
        except RucherError:
            return None
        return {status.storage for status in report.storages if status.active}

    async def abort(self, node: str, command: compute.VmMigrateAbort) -> None:
        """Tell ``node`` the migration failed: it frees what it prepared."""
        await self.bus.request(
            compute.GUEST_MIGRATE_ABORT.to(node=node), command, timeout=self.timeout
        )


def _handler(
    operation: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle


def migrator(
    context: ServiceContext, settings: ComputeSettings, service: ComputeService
) -> Migrator:
    """This node's migrator: its peers, and where its libvirtd takes incoming guests."""
    address = settings.migration_address
    return Migrator(
        service,
        GuestRegistry(context.bus),
        BusPeers(context.bus, context.registry),
        migration_address=address,
        peer_uri=f"qemu+tcp://{address}/system" if address else None,
    )


async def serve_migration(
    context: ServiceContext, settings: ComputeSettings, service: ComputeService
) -> None:
    """Answer this node's migrate, precondition, prepare, abort and finish subjects."""
    migrations = migrator(context, settings, service)
    routes: list[tuple[Any, Callable[[Any], Awaitable[Any]]]] = [
        (compute.GUEST_MIGRATE, migrations.migrate),
        (compute.GUEST_MIGRATE_CHECK, migrations.check),
        (compute.GUEST_MIGRATE_PREPARE, migrations.prepare),
        (compute.GUEST_MIGRATE_FINISH, migrations.finish),
        (compute.GUEST_MIGRATE_ABORT, migrations.abort),
    ]
    for subject, operation in routes:
        await context.bus.serve(subject, _handler(operation), node=service.node)
