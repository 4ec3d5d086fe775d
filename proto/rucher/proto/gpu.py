"""GPUs and PCI devices: each node's inventory, and allocation for passthrough, mdev, MIG and VFs.

The GPU broker on each node discovers its devices (PCI sysfs, NVML) and publishes the inventory;
the scheduler chooses a node and a kind of device from it, and the broker on that node allocates
the actual device, mediated device or MIG slice under a lease owned by the guest
(``rpc.gpu.device_allocate.{node}``). Releases are durable commands, so a release sent while the
broker restarts is still applied.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import msgspec

from rucher.proto.base import Command, Event, Kind, Reply, RpcSubject, Scope, Subject
from rucher.proto.common import AuthId, ByteSize, ConfigKey, Done, NodeName, Query, Vmid
from rucher.proto.guest import GuestType

PciAddress = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$",
        description="A PCI function address, domain:bus:device.function (0000:41:00.0).",
    ),
]
PciId = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{4}$", description="A PCI vendor or device id, 4 lower-case hex digits."
    ),
]
PciClass = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{6}$", description="A PCI class code, 6 lower-case hex digits (030200)."
    ),
]
MigProfileName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[1-8]g\.[0-9]+gb(\+[a-z0-9]+)?$",
        description="A MIG GPU-instance profile as NVIDIA names it, e.g. 1g.18gb or 1g.18gb+me.",
    ),
]


class GpuKind(StrEnum):
    """How a guest gets (part of) a device."""

    PASSTHROUGH = "passthrough"
    MDEV = "mdev"
    MIG = "mig"
    VF = "vf"


class ReleaseReason(StrEnum):
    """Why a device lease ended."""

    GUEST_STOPPED = "guest_stopped"
    GUEST_DESTROYED = "guest_destroyed"
    ALLOCATION_FAILED = "allocation_failed"
    RECONCILED = "reconciled"
    REQUESTED = "requested"


# Inventory records ---------------------------------------------------------------------------


class MigPlacement(msgspec.Struct, frozen=True, kw_only=True):
    """A range of MIG memory slices: where a GPU instance may sit or sits."""

    start: Annotated[int, msgspec.Meta(ge=0)]
    size: Annotated[int, msgspec.Meta(ge=1)]


class MigProfile(msgspec.Struct, frozen=True, kw_only=True):
    """A MIG GPU-instance profile of one GPU, its legal placements and those still free."""

    profile_id: Annotated[int, msgspec.Meta(ge=0)]
    name: MigProfileName
    slices: Annotated[int, msgspec.Meta(ge=1)]
    max_instances: Annotated[int, msgspec.Meta(ge=1)]
    memory: ByteSize
    multiprocessors: Annotated[int, msgspec.Meta(ge=0)] = 0
    placements: tuple[MigPlacement, ...] = ()
    free_placements: tuple[MigPlacement, ...] = ()


class MigInstance(msgspec.Struct, frozen=True, kw_only=True):
    """A MIG GPU instance (and its compute instance) that exists on a GPU."""

    gpu_instance_id: Annotated[int, msgspec.Meta(ge=0)]
    profile_id: Annotated[int, msgspec.Meta(ge=0)]
    placement: MigPlacement
    compute_instance_id: Annotated[int, msgspec.Meta(ge=0)] | None = None
    uuid: str | None = None
    lease_id: str | None = None


class MdevType(msgspec.Struct, frozen=True, kw_only=True):
    """A mediated-device type a device offers (``mdev_supported_types``)."""

    type_id: str
    name: str = ""
    description: str = ""
    device_api: str = "vfio-pci"
    available_instances: Annotated[int, msgspec.Meta(ge=0)] = 0


class VgpuType(msgspec.Struct, frozen=True, kw_only=True):
    """A vGPU type NVML reports for a GPU under the NVIDIA vGPU host driver."""

    type_id: Annotated[int, msgspec.Meta(ge=0)]
    name: str
    vgpu_class: str = ""
    framebuffer: ByteSize = 0
    max_instances: Annotated[int, msgspec.Meta(ge=0)] = 0
    creatable: bool = False


class PciDevice(msgspec.Struct, frozen=True, kw_only=True):
    """One PCI function of a node as discovered, with what NVML adds for NVIDIA GPUs.

    ``lease_id`` is set while the whole function is leased (passthrough or VF).
    """

    address: PciAddress
    vendor_id: PciId
    device_id: PciId
    class_code: PciClass
    subsystem_vendor_id: PciId | None = None
    subsystem_device_id: PciId | None = None
    vendor_name: str = ""
    device_name: str = ""
    driver: str | None = None
    iommu_group: Annotated[int, msgspec.Meta(ge=0)] | None = None
    iommu_group_members: tuple[PciAddress, ...] = ()
    numa_node: int | None = None
    reset_method: tuple[str, ...] = ()
    sriov_totalvfs: Annotated[int, msgspec.Meta(ge=0)] = 0
    sriov_numvfs: Annotated[int, msgspec.Meta(ge=0)] = 0
    physfn: PciAddress | None = None
    mdev_types: tuple[MdevType, ...] = ()
    uuid: str | None = None
    memory: ByteSize | None = None
    mig_enabled: bool = False
    mig_pending: bool | None = None
    mig_profiles: tuple[MigProfile, ...] = ()
    mig_instances: tuple[MigInstance, ...] = ()
    lease_id: str | None = None
    vgpu_types: tuple[VgpuType, ...] = ()


class GpuInventory(msgspec.Struct, frozen=True, kw_only=True):
    """A node's PCI devices of interest (GPUs, their functions and VFs), as the broker sees them.

    ``claims`` names the scheduler claims whose devices this inventory already shows allocated
    (``DeviceAllocate.claim_id``), so the scheduler does not count them twice.
    """

    node: NodeName
    devices: tuple[PciDevice, ...]
    time: float
    driver_version: str | None = None
    claims: tuple[str, ...] = ()


class GpuLease(msgspec.Struct, frozen=True, kw_only=True):
    """A device, mediated device or MIG slice held by one guest, recorded by the broker.

    ``original_drivers`` names, for each function the lease bound to ``vfio-pci`` (the whole
    IOMMU group), the driver it had before ("" for none), restored on release. A ``pending``
    lease is recorded just before the host change and replaced once it is made: one still
    pending when the broker starts is undone (its change may or may not have happened).
    """

    lease_id: str
    node: NodeName
    vmid: Vmid
    guest_type: GuestType
    kind: GpuKind
    address: PciAddress
    slot: ConfigKey
    created: float
    mdev_uuid: str | None = None
    mdev_type: str | None = None
    mig_instance: MigInstance | None = None
    original_driver: str | None = None
    original_drivers: dict[PciAddress, str] = {}
    command_id: str | None = None
    claim_id: str | None = None
    pending: bool = False


class PciMappingEntry(msgspec.Struct, frozen=True, kw_only=True):
    """Where a named mapping points on one node (one ``map`` item of ``/cluster/mapping/pci``)."""

    node: NodeName
    path: PciAddress
    vendor_id: PciId
    device_id: PciId
    subsystem_vendor_id: PciId | None = None
    subsystem_device_id: PciId | None = None
    iommu_group: Annotated[int, msgspec.Meta(ge=0)] | None = None
    description: str = ""


class PciMapping(msgspec.Struct, frozen=True, kw_only=True):
    """A cluster-wide named PCI resource mapping (``/cluster/mapping/pci/{id}``)."""

    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,127}$")]
    map: tuple[PciMappingEntry, ...]
    description: str = ""
    mdev: bool = False
    live_migration_capable: bool = False


class PciMappingState(msgspec.Struct, frozen=True, kw_only=True):
    """A stored mapping with its digest (SHA-1 of its canonical form), for guarded updates."""

    mapping: PciMapping
    digest: str


# Commands and replies ------------------------------------------------------------------------


class DeviceAllocate(Command, frozen=True, kw_only=True, tag="gpu.device.allocate"):
    """Lease a device to a guest: by mapping, address or model; as a whole, an mdev or MIG slice.

    ``slot`` is the guest config key the device serves (``hostpci0``, ``dev0``). The broker
    picks the function, mdev type instance or MIG placement itself, keeping large profiles
    possible.
    """

    vmid: Vmid
    guest_type: GuestType
    kind: GpuKind
    slot: ConfigKey
    mapping: str | None = None
    address: PciAddress | None = None
    vendor_id: PciId | None = None
    device_id: PciId | None = None
    mdev_type: str | None = None
    mig_profile: MigProfileName | None = None
    claim_id: str | None = None


class DeviceAllocation(Reply, frozen=True, kw_only=True, tag="gpu.device.allocation"):
    """What the agent needs to attach the leased device: a libvirt ``<hostdev>`` or LXD device."""

    lease: GpuLease
    libvirt_hostdev: str | None = None
    lxd_device: dict[str, str] = {}


class DeviceRelease(Command, frozen=True, kw_only=True, tag="gpu.device.release"):
    """End a guest's device leases: one lease, or all it holds on the node when none is named."""

    vmid: Vmid
    reason: ReleaseReason
    lease_id: str | None = None


class PciListQuery(Query, frozen=True, kw_only=True, tag="gpu.pci.list"):
    """Every PCI function of the node as discovered now (``/nodes/{node}/hardware/pci``)."""


class PciListing(Reply, frozen=True, kw_only=True, tag="gpu.pci.listing"):
    """A node's PCI functions, all of them, with leases marked."""

    devices: tuple[PciDevice, ...]


class MappingListQuery(Query, frozen=True, kw_only=True, tag="gpu.mapping.list"):
    """The PCI mappings, or the one named ``id``."""

    id: str | None = None


class MappingListing(Reply, frozen=True, kw_only=True, tag="gpu.mapping.listing"):
    """PCI mappings with their digests, sorted by id."""

    mappings: tuple[PciMappingState, ...]


class MappingCreate(Command, frozen=True, kw_only=True, tag="gpu.mapping.create"):
    """Add a PCI mapping; refused if the id exists or an entry names a device its node lacks."""

    mapping: PciMapping
    user: AuthId | None = None


class MappingUpdate(Command, frozen=True, kw_only=True, tag="gpu.mapping.update"):
    """Replace a PCI mapping if it still has ``digest`` (when given)."""

    mapping: PciMapping
    digest: str | None = None
    user: AuthId | None = None


class MappingDelete(Command, frozen=True, kw_only=True, tag="gpu.mapping.delete"):
    """Remove a PCI mapping."""

    id: str
    user: AuthId | None = None


# Events --------------------------------------------------------------------------------------


class InventoryPublished(Event, frozen=True, kw_only=True, tag="gpu.inventory.published"):
    """A node's device inventory, published at start and whenever it changes."""

    inventory: GpuInventory


class DeviceAllocated(Event, frozen=True, kw_only=True, tag="gpu.device.allocated"):
    """A device, mdev or MIG slice was leased to a guest."""

    lease: GpuLease


class DeviceReleased(Event, frozen=True, kw_only=True, tag="gpu.device.released"):
    """A lease ended and its device was given back (driver restored, mdev or MIG removed)."""

    lease_id: str
    vmid: Vmid
    kind: GpuKind
    address: PciAddress
    reason: ReleaseReason


# Subjects ------------------------------------------------------------------------------------

DEVICE_ALLOCATE = RpcSubject(
    "rpc.gpu.device_allocate.{node}",
    DeviceAllocate,
    Kind.RPC,
    Scope.NODE,
    "Lease a GPU, mdev, MIG slice or VF on {node} to a guest.",
    reply=DeviceAllocation,
)
DEVICE_RELEASE = Subject(
    "cmd.gpu.device_release.{node}",
    DeviceRelease,
    Kind.COMMAND,
    Scope.NODE,
    "Release a guest's device leases on {node}; durable, applied once.",
)
INVENTORY_PUBLISHED = Subject(
    "evt.gpu.inventory_published.{node}",
    InventoryPublished,
    Kind.EVENT,
    Scope.NODE,
    "The device inventory of {node}.",
)
DEVICE_ALLOCATED = Subject(
    "evt.gpu.device_allocated.{node}",
    DeviceAllocated,
    Kind.EVENT,
    Scope.NODE,
    "A device on {node} was leased to a guest.",
)
DEVICE_RELEASED = Subject(
    "evt.gpu.device_released.{node}",
    DeviceReleased,
    Kind.EVENT,
    Scope.NODE,
    "A device lease on {node} ended.",
)
PCI_LIST = RpcSubject(
    "rpc.gpu.pci_list.{node}",
    PciListQuery,
    Kind.RPC,
    Scope.NODE,
    "List every PCI function of {node}, with its mdev types, MIG state and leases.",
    reply=PciListing,
)
MAPPING_LIST = RpcSubject(
    "rpc.gpu.mapping_list",
    MappingListQuery,
    Kind.RPC,
    Scope.CLUSTER,
    "List the cluster-wide PCI mappings.",
    reply=MappingListing,
)
MAPPING_CREATE = RpcSubject(
    "rpc.gpu.mapping_create",
    MappingCreate,
    Kind.RPC,
    Scope.CLUSTER,
    "Add a cluster-wide PCI mapping.",
    reply=Done,
)
MAPPING_UPDATE = RpcSubject(
    "rpc.gpu.mapping_update",
    MappingUpdate,
    Kind.RPC,
    Scope.CLUSTER,
    "Replace a cluster-wide PCI mapping, guarded by its digest.",
    reply=Done,
)
MAPPING_DELETE = RpcSubject(
    "rpc.gpu.mapping_delete",
    MappingDelete,
    Kind.RPC,
    Scope.CLUSTER,
    "Remove a cluster-wide PCI mapping.",
    reply=Done,
)
