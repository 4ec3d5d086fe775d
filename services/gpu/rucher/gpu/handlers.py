"""One declaration per GPU subject: the bus decodes, the broker or the mappings answer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from rucher.bus import Bus, RucherError
from rucher.bus.codec import decode
from rucher.bus.consumer import Consumer, Delivery, consume
from rucher.gpu.host import HostError
from rucher.gpu.mappings import Mappings
from rucher.gpu.service import GpuBroker
from rucher.proto import compute, container, gpu
from rucher.proto.base import RpcSubject, Scope, Subject
from rucher.proto.common import PowerState
from rucher.proto.gpu import DeviceRelease, ReleaseReason
from rucher.proto.keys import encode_token
from rucher.proto.streams import COMMANDS

log = structlog.get_logger("rucher.gpu.handlers")

Operation = Callable[[Any], Awaitable[Any]]
GUEST_ENDS: tuple[Subject[Any], ...] = (
    compute.GUEST_STATE_CHANGED,
    compute.GUEST_DESTROYED,
    compute.GUEST_MIGRATED,
    container.GUEST_STATE_CHANGED,
    container.GUEST_DESTROYED,
    container.GUEST_MIGRATED,
)


def routes(broker: GpuBroker, mappings: Mappings) -> list[tuple[RpcSubject[Any, Any], Operation]]:
    """Every ``rpc.gpu.*`` subject with the operation answering it."""
    return [
        (gpu.DEVICE_ALLOCATE, broker.allocate),
        (gpu.PCI_LIST, broker.list_pci),
        (gpu.MAPPING_LIST, mappings.list),
        (gpu.MAPPING_CREATE, mappings.create),
        (gpu.MAPPING_UPDATE, mappings.update),
        (gpu.MAPPING_DELETE, mappings.delete),
    ]


def _plain(operation: Operation) -> Callable[[Any, dict[str, str]], Awaitable[Any]]:
    async def handle(message: Any, _headers: dict[str, str]) -> Any:
        return await operation(message)

    return handle


def ended_reason(event: Any) -> ReleaseReason | None:
    """Why a guest event ends the guest's leases on this node, or None if it does not."""
    if isinstance(event, compute.VmStateChanged | container.CtStateChanged):
        return ReleaseReason.GUEST_STOPPED if event.state is PowerState.STOPPED else None
    return ReleaseReason.GUEST_DESTROYED


async def serve(
    bus: Bus, broker: GpuBroker, mappings: Mappings
) -> tuple[Consumer[DeviceRelease], list[Subscription]]:
    """Answer every GPU subject; releases come through the durable command stream."""
    for subject, operation in routes(broker, mappings):
        if subject.scope is Scope.NODE:
            await bus.serve(subject, _plain(operation), node=bus.node)
        else:
            await bus.serve(subject, _plain(operation))

    async def release(command: DeviceRelease, _delivery: Delivery) -> None:
        await broker.release(command)

    consumer = await consume(
        bus,
        stream=COMMANDS,
        durable=f"gpu-release-{encode_token(bus.node)}",
        filter_subject=gpu.DEVICE_RELEASE.to(node=bus.node).subject,
        payload=DeviceRelease,
        handler=release,
        dedupe=True,
    )
    return consumer, await follow_guest_ends(bus, broker)


async def follow_guest_ends(bus: Bus, broker: GpuBroker) -> list[Subscription]:
    """Release a guest's leases when it stops, is destroyed or leaves this node.

    A live subscription: what happens while the broker is down is the restart reconcile's.
    """
    subscriptions = []
    for subject in GUEST_ENDS:

        async def on_event(msg: Msg, subject: Subject[Any] = subject) -> None:
            try:
                event = decode(msg.data, subject.payload)
            except RucherError:
                log.warning("event_unreadable", subject=msg.subject)
                return
            reason = ended_reason(event)
            if reason is None:
                return
            try:
                await broker.release(
                    DeviceRelease(command_id=event.event_id, vmid=event.vmid, reason=reason)
                )
            except (RucherError, HostError) as err:
                log.warning("release_failed", vmid=event.vmid, error=str(err))

        address = subject.to(node=bus.node)
        subscriptions.append(await bus.nc.subscribe(address.subject, cb=on_event))
    return subscriptions
