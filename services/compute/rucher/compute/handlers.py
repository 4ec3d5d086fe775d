"""One declaration per compute subject: decode (done by the bus), call the service, reply."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus
from rucher.compute import clone, pending, probes, snapshots
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.base import RpcSubject


def routes(service: ComputeService) -> list[tuple[RpcSubject[Any, Any], Callable[[Any], Any]]]:
    """Every ``rpc.compute.*.{node}`` subject this agent answers, with its operation."""
    return [
        (compute.GUEST_CREATE, service.create),
        (compute.GUEST_CONFIG_UPDATE, service.update_config),
        (compute.GUEST_START, service.start),
        (compute.GUEST_STOP, service.stop),
        (compute.GUEST_SHUTDOWN, service.shutdown),
        (compute.GUEST_REBOOT, service.reboot),
        (compute.GUEST_RESET, service.reset),
        (compute.GUEST_SUSPEND, service.suspend),
        (compute.GUEST_RESUME, service.resume),
        (compute.GUEST_DESTROY, service.destroy),
        (compute.GUEST_STATUS, service.status),
        (compute.SNAPSHOT_CREATE, functools.partial(snapshots.create, service)),
        (compute.SNAPSHOT_ROLLBACK, functools.partial(snapshots.rollback, service)),
        (compute.SNAPSHOT_DELETE, functools.partial(snapshots.delete, service)),
        (compute.SNAPSHOT_UPDATE, functools.partial(snapshots.update, service)),
        (compute.GUEST_TEMPLATE, functools.partial(clone.template, service)),
        (compute.GUEST_CLONE, functools.partial(clone.clone, service)),
        (compute.DISK_RESIZE, functools.partial(pending.resize, service)),
        (compute.GUEST_DOMAIN_PROBE, functools.partial(probes.answer_probe, service)),
    ]


def _handler(
    operation: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle


async def serve(bus: Bus, service: ComputeService) -> None:
    """Answer every compute subject for this node."""
    for subject, operation in routes(service):
        await bus.serve(subject, _handler(operation), node=service.node)
