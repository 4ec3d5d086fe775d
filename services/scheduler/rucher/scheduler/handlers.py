"""One declaration per scheduler subject: decode (done by the bus), call the service, reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from rucher.bus import Bus
from rucher.bus.consumer import Consumer, Delivery, consume
from rucher.proto import scheduler
from rucher.proto.base import RpcSubject
from rucher.proto.streams import COMMANDS
from rucher.scheduler.service import SchedulerService

RELEASE_CONSUMER = "scheduler-claim-release"


def routes(service: SchedulerService) -> list[tuple[RpcSubject[Any, Any], Callable[[Any], Any]]]:
    """Every ``rpc.scheduler.*`` subject with the operation answering it."""
    return [
        (scheduler.GUEST_PLACE, service.place_guest),
        (scheduler.GROUP_PLACE, service.place_group),
        (scheduler.MIGRATION_SUGGEST, service.suggest_migration),
        (scheduler.REBALANCE_PLAN, service.plan_rebalance),
        (scheduler.CLAIM_CONFIRM, service.confirm),
    ]


def _handler(
    operation: Callable[[Any], Awaitable[Any]],
) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle


async def serve(bus: Bus, service: SchedulerService) -> Consumer[scheduler.ClaimRelease]:
    """Answer every scheduler subject; releases come through the durable command stream."""
    for subject, operation in routes(service):
        await bus.serve(subject, _handler(operation))

    async def release(command: scheduler.ClaimRelease, _delivery: Delivery) -> None:
        await service.release(command)

    return await consume(
        bus,
        stream=COMMANDS,
        durable=RELEASE_CONSUMER,
        filter_subject=scheduler.CLAIM_RELEASE.wildcard(),
        payload=scheduler.ClaimRelease,
        handler=release,
        dedupe=True,
    )
