"""``POST /cluster/qemu``: Rucher's API extension that creates a VM on a node the scheduler picks.

Proxmox has no such call: every create names its node (``POST /nodes/{node}/qemu``). The
extension takes the same parameters minus ``node``, plus placement hints (``strategy``,
``cpu-flags``, ``nodes``, ``exclude-nodes``). The gateway asks the scheduler to place the VM (a
claim reserves the room), then sends the create with the claim to the chosen node's agent, which
confirms the claim once the VM is defined (or releases it when the create fails). The answer is
the create task's UPID, whose node is the chosen node. A refused placement is an error whose
message is the scheduler's explanation: which filter removed how many nodes.
"""

from __future__ import annotations

import re

import msgspec
import structlog

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.gateway.permissions import forbidden
from rucher.gateway.routes.qemu import CREATE_CONTROLS
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import compute
from rucher.proto.cluster import CpuArch
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import GpuKind
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import (
    CLAIM_RELEASE,
    GUEST_PLACE,
    ClaimRelease,
    GpuRequest,
    PlaceGuest,
    PlacementPolicy,
    PlacementSpec,
    PlacementStrategy,
    ResourceRequest,
)
from rucher.pve.schema import ApiSchema, Endpoint, Param, ParamsSpec

ROUTES = RouteTable()
log = structlog.get_logger("rucher.gateway.placement")

PATH = "/cluster/qemu"
BASE = ("POST", "/nodes/{node}/qemu")
# Seconds the claim holds the room until the agent confirms it: the create task allocates the
# disks first, which may take a while on slow storage.
CLAIM_TTL = 300.0
_LIST = re.compile(r"[,; ]+")
_DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio|efidisk|tpmstate)\d+$")
_HOSTPCI_KEY = re.compile(r"^hostpci\d+$")
# Scheduler request fields named by a refusal, as the API parameters they came from.
FIELDS = {"cpu_flags": "cpu-flags", "vcpus": "cores", "gpus": "hostpci0", "candidates": "nodes"}

HINTS: dict[str, Param] = {
    "strategy": Param(
        type="string",
        enum=tuple(strategy.value for strategy in PlacementStrategy),
        optional=True,
        description="Rucher: spread guests over nodes (most free room first) or pack them "
        "(fullest node that fits). Defaults to the scheduler's setting.",
    ),
    "cpu-flags": Param(
        type="string",
        pattern=r"[A-Za-z0-9_.-]+(?:[,; ]+[A-Za-z0-9_.-]+)*",
        max_length=4096,
        optional=True,
        description="Rucher: CPU flags the chosen node must have (list, e.g. 'aes;avx2').",
    ),
    "nodes": Param(
        type="string",
        format="pve-node-list",
        optional=True,
        description="Rucher: only consider these nodes.",
    ),
    "exclude-nodes": Param(
        type="string",
        format="pve-node-list",
        optional=True,
        description="Rucher: never choose these nodes.",
    ),
}


def extension(base: Endpoint) -> Endpoint:
    """The extension's endpoint: ``base``'s parameters minus ``node``, plus the hints."""
    properties = {
        name: param for name, param in base.parameters.properties.items() if name != "node"
    }
    properties.update(HINTS)
    return Endpoint(
        method="POST",
        path=PATH,
        name="create_vm_placed",
        description="Rucher extension: create a VM on the node the scheduler chooses; "
        "returns the create task's UPID.",
        permissions=base.permissions,
        allowtoken=base.allowtoken,
        protected=base.protected,
        parameters=ParamsSpec(
            additional_properties=base.parameters.additional_properties,
            properties=properties,
        ),
        returns=base.returns,
    )


def extend(schema: ApiSchema) -> ApiSchema:
    """``schema`` with Rucher's extension endpoints (derived from the Proxmox ones)."""
    if BASE not in schema.by_key or ("POST", PATH) in schema.by_key:
        return schema
    return msgspec.structs.replace(
        schema, endpoints=(*schema.endpoints, extension(schema.by_key[BASE]))
    )


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name for name in _LIST.split(text or "") if name)


def _parts(value: str) -> tuple[str | None, dict[str, str]]:
    """A property string's unnamed first part and its ``key=value`` parts."""
    first: str | None = None
    named: dict[str, str] = {}
    for index, part in enumerate(value.split(",")):
        key, sep, rest = part.partition("=")
        if not sep:
            if index == 0:
                first = part
            continue
        named[key.strip()] = rest.strip()
    return first, named


def _memory(value: str | None) -> int:
    """Bytes of ``memory`` (``[current=]MiB``; Proxmox's default is 512 MiB)."""
    if value is None:
        return 512 << 20
    first, named = _parts(value)
    return int(named.get("current", first or 512)) << 20


def _storages(config: dict[str, str]) -> tuple[str, ...]:
    """The storages the VM's disks live on or are allocated from (``STORAGE:...``)."""
    found: list[str] = []
    for key, value in config.items():
        if not _DISK_KEY.match(key):
            continue
        first, named = _parts(value)
        volume = named.get("file", first) or ""
        storage, sep, _ = volume.partition(":")
        if sep and storage and not volume.startswith("/") and storage not in found:
            found.append(storage)
    return tuple(found)


def _gpus(config: dict[str, str]) -> tuple[GpuRequest, ...]:
    """Devices asked for by name: ``hostpciN`` with a ``mapping`` (and maybe an ``mdev`` type)."""
    requests = []
    for key, value in sorted(config.items()):
        if not _HOSTPCI_KEY.match(key):
            continue
        _, named = _parts(value)
        mapping = named.get("mapping")
        if mapping is None:
            continue
        mdev = named.get("mdev")
        requests.append(
            GpuRequest(
                kind=GpuKind.MDEV if mdev else GpuKind.PASSTHROUGH, mapping=mapping, mdev_type=mdev
            )
        )
    return tuple(requests)


def spec(call: Call, config: dict[str, str]) -> PlacementSpec:
    """What the scheduler must find room for, from the create's parameters and hints."""
    p = call.params
    vcpus = int(p["cores"] or 1) * int(p["sockets"] or 1)
    resources = call.command(
        ResourceRequest,
        vcpus=vcpus,
        memory=_memory(p["memory"]),
        arch=CpuArch(p["arch"]) if p["arch"] else None,
        cpu_flags=_names(p["cpu-flags"]),
        storages=_storages(config),
        gpus=_gpus(config),
    )
    return call.command(
        PlacementSpec,
        vmid=p["vmid"],
        guest_type=GuestType.QEMU,
        resources=resources,
        candidates=_names(p["nodes"]),
        exclude=_names(p["exclude-nodes"]),
    )


def _refused(err: RucherError) -> RucherError:
    """The scheduler's refusal with the request parameter it names, if any."""
    field = err.details.get("field")
    if not isinstance(field, str):
        return err
    details = {**err.details, "field": FIELDS.get(field, field)}
    return RucherError(err.code, err.message, retryable=err.retryable, details=details)


@ROUTES("POST", PATH)
async def create_vm_placed(call: Call) -> str:
    """Create a VM where the scheduler finds room: VM.Allocate on /vms/{vmid} or on its pool."""
    p = call.params
    vmid, pool = p["vmid"], p["pool"]
    allowed = call.allowed(f"/vms/{vmid}", ["VM.Allocate"]) or (
        pool is not None and call.allowed(f"/pool/{pool}", ["VM.Allocate"])
    )
    if not allowed:
        raise forbidden(f"Permission check failed (/vms/{vmid}, VM.Allocate)")
    if p["archive"] is not None:
        raise RucherError(ErrorCode.UNSUPPORTED, "restoring from a backup is not supported yet")
    config = {
        name: "1" if value is True else "0" if value is False else str(value)
        for name, value in p.values.items()
        if name not in CREATE_CONTROLS and name not in HINTS and value is not None
    }
    strategy = p["strategy"]
    command = call.command(
        PlaceGuest,
        spec=spec(call, config),
        claim_ttl=CLAIM_TTL,
        policy=PlacementPolicy(strategy=PlacementStrategy(strategy)) if strategy else None,
    )
    try:
        decision = await call.ask(GUEST_PLACE.address, command)
    except RucherError as err:
        raise _refused(err) from err
    placement = decision.placement
    create = call.command(
        compute.VmCreate,
        vmid=vmid,
        user=call.authid,
        config=config,
        start=p["start"],
        pool=pool,
        claim_id=placement.claim_id,
        claim_token=placement.claim_token,
    )
    try:
        reply = await call.ask(compute.GUEST_CREATE.to(node=placement.node), create)
    except RucherError as err:
        if err.code is ErrorCode.TIMEOUT:
            # The agent may still have taken it: it confirms the claim, or the claim runs out.
            raise
        # No task took the claim over: give the room back now rather than at its expiry.
        release = ClaimRelease(
            command_id=new_id(),
            claim_id=placement.claim_id,
            reason=f"create refused: {err.message}",
            node=placement.node,
            vmid=vmid,
        )
        try:
            await call.gateway.bus.publish(CLAIM_RELEASE.address, release)
        except RucherError as lost:
            # The claim then runs out on its own after CLAIM_TTL.
            log.warning("claim_release_lost", claim=placement.claim_id, error=lost.message)
        raise
    return reply.upid
