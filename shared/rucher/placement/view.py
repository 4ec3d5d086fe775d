"""The columnar cluster view: one array per resource, one row per node, updated in place.

Filters and weighers read whole columns (``view.mem_free[nodes]``) instead of visiting nodes one
by one. Each node's row is derived from what its agents last published (capacity, storages, GPU
inventory) minus the reservations held on it (claims and running guests); an update touches
only that node's row, so keeping the view current costs nothing per decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from rucher.placement.bits import Interner, bitset, words_for
from rucher.placement.gpus import GpuRows, apply_gpu_requests
from rucher.placement.mig import NO_GPU, MigCatalog
from rucher.proto.cluster import NodeCapacity
from rucher.proto.gpu import GpuInventory, PciMapping, PciMappingEntry
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import NodeAffinity, ResourceAffinity, ResourceRequest
from rucher.proto.storage import StorageStatus

Selector = slice | NDArray[np.intp]
_ROWS = 16


@dataclass(frozen=True, slots=True)
class Reservation:
    """Resources held on a node for one guest: a claim, or a guest already running there.

    ``gpu_applied`` says the node's GPU inventory already shows the guest's devices as taken.
    """

    key: str
    vmid: int
    resources: ResourceRequest
    guest_type: GuestType = GuestType.QEMU
    gpu_applied: bool = False
    node_affinity: NodeAffinity | None = None
    resource_affinity: tuple[ResourceAffinity, ...] = ()


@dataclass
class _Node:
    capacity: NodeCapacity | None = None
    storages: tuple[StorageStatus, ...] = ()
    inventory: GpuInventory | None = None
    reservations: dict[str, Reservation] = field(default_factory=dict)
    online: bool = False
    maintenance: bool = False


class ClusterView:
    """Every node's capacity and free resources as numpy columns, plus where each guest is."""

    def __init__(self, *, cpu_overcommit: float = 1.0) -> None:
        if cpu_overcommit <= 0:
            raise ValueError("the CPU overcommit ratio must be positive")
        self.cpu_overcommit = cpu_overcommit
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.size = 0
        self.epoch = 0  # grows whenever capacity, storages or GPU inventories change
        self.locations: dict[int, int] = {}
        self.archs: Interner[str] = Interner()
        self.flags: Interner[str] = Interner()
        self.storage_ids: Interner[str] = Interner()
        self.gpu = GpuRows(_ROWS)
        self.mig: MigCatalog = self.gpu.catalog
        self.mappings: dict[str, PciMapping] = {}
        self._mapped: dict[str, list[tuple[str, PciMappingEntry]]] = {}  # node -> its entries
        self._nodes: list[_Node] = []
        self._max_cache: dict[str, tuple[int, float]] = {}
        # Filters' cached "nodes that have X at all", keyed by what X is (see filters.base).
        self._ranked = True
        self._present_total = 0
        # Reservations whose GPU requests a node could not hold (its inventory changed, mostly).
        self._gpu_failed: dict[int, set[str]] = {}
        self.narrowing: dict[tuple[object, ...], tuple[int, NDArray[np.intp]]] = {}
        self._allocate(_ROWS)

    # Storage of the columns ---------------------------------------------------------------

    def _allocate(self, rows: int) -> None:
        self.present = np.zeros(rows, dtype=np.bool_)
        self.schedulable = np.zeros(rows, dtype=np.bool_)
        self.cpus = np.zeros(rows, dtype=np.float64)
        self.vcpu_total = np.zeros(rows, dtype=np.float64)
        self.vcpu_used = np.zeros(rows, dtype=np.float64)
        self.vcpu_free = np.zeros(rows, dtype=np.float64)
        self.mem_total = np.zeros(rows, dtype=np.int64)
        self.mem_used = np.zeros(rows, dtype=np.int64)
        self.mem_free = np.zeros(rows, dtype=np.int64)
        self.cpu_load = np.zeros(rows, dtype=np.float64)
        self.mem_measured = np.zeros(rows, dtype=np.float64)
        self.guests = np.zeros(rows, dtype=np.int32)
        self.arch = np.full(rows, -1, dtype=np.int16)
        self.rank = np.zeros(rows, dtype=np.int32)
        self.cpu_flags = np.zeros((rows, 1), dtype=np.uint64)
        self.storage = np.zeros((rows, 1), dtype=np.uint64)

    def _grow(self) -> None:
        rows = max(_ROWS, 2 * len(self.present))
        for name in (
            "present",
            "schedulable",
            "cpus",
            "vcpu_total",
            "vcpu_used",
            "vcpu_free",
            "mem_total",
            "mem_used",
            "mem_free",
            "cpu_load",
            "mem_measured",
            "guests",
            "arch",
            "rank",
            "cpu_flags",
            "storage",
        ):
            old = getattr(self, name)
            new = np.zeros((rows, *old.shape[1:]), dtype=old.dtype)
            if name == "arch":
                new[:] = -1
            new[: len(old)] = old
            setattr(self, name, new)
        self.gpu.grow(rows)

    def _widen_bits(self, name: str, bits: int) -> None:
        old: NDArray[np.uint64] = getattr(self, name)
        words = words_for(bits)
        if words > old.shape[1]:
            new = np.zeros((old.shape[0], words), dtype=np.uint64)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def row(self, node: str) -> int:
        """The row of ``node``, adding an empty (absent) row on first sight."""
        found = self.index.get(node)
        if found is not None:
            return found
        if self.size == len(self.present):
            self._grow()
        found = self.index[node] = self.size
        self.names.append(node)
        self._nodes.append(_Node())
        self.size += 1
        self._ranked = False
        return found

    def ranks(self, rows: NDArray[np.intp]) -> NDArray[np.int32]:
        """Each row's position in name order (ties between equal scores go to the first name)."""
        if not self._ranked:
            order = np.argsort(np.array(self.names, dtype=object), kind="stable")
            self.rank[order] = np.arange(self.size, dtype=np.int32)
            self._ranked = True
        return self.rank[rows]

    # Updates from the agents --------------------------------------------------------------

    def set_capacity(self, capacity: NodeCapacity) -> int:
        """Take a node's published capacity (CPUs, memory, architecture, flags, load)."""
        i = self.row(capacity.node)
        node = self._nodes[i]
        node.capacity = capacity
        self._present_total += not self.present[i]
        self.present[i] = True
        self.cpus[i] = capacity.cpus
        self.vcpu_total[i] = capacity.cpus * self.cpu_overcommit
        self.mem_total[i] = capacity.memory_total
        self.cpu_load[i] = capacity.cpu_usage
        self.mem_measured[i] = capacity.memory_used
        self.arch[i] = self.archs.intern(capacity.arch.value)
        bits = [self.flags.intern(flag) for flag in capacity.cpu_flags]
        self._widen_bits("cpu_flags", len(self.flags))
        self.cpu_flags[i] = bitset(bits, self.cpu_flags.shape[1])
        self._update_free(i)
        self._update_schedulable(i)
        self._changed()
        return i

    def set_online(self, node: str, online: bool) -> None:
        """Whether the node's agents are registered (alive)."""
        i = self.row(node)
        self._nodes[i].online = online
        self._update_schedulable(i)

    def set_maintenance(self, node: str, maintenance: bool) -> None:
        """Whether the node is in maintenance (or otherwise closed to new guests)."""
        i = self.row(node)
        self._nodes[i].maintenance = maintenance
        self._update_schedulable(i)

    def set_storages(self, node: str, storages: Iterable[StorageStatus]) -> None:
        """The storages a node reaches; only active, enabled ones count."""
        i = self.row(node)
        self._nodes[i].storages = tuple(storages)
        # Every storage seen is known (a request for it is not impossible), only usable ones set.
        known = [(self.storage_ids.intern(s.storage), s) for s in self._nodes[i].storages]
        bits = [bit for bit, status in known if status.active and status.enabled]
        self._widen_bits("storage", len(self.storage_ids))
        self.storage[i] = bitset(bits, self.storage.shape[1])
        self._changed()

    def set_gpu_inventory(self, inventory: GpuInventory) -> None:
        """A node's GPUs, mdev types and MIG layouts as its GPU broker published them."""
        i = self.row(inventory.node)
        self._nodes[i].inventory = inventory
        self._refresh_gpus(i)
        self.gpu.epoch += 1
        self._changed()

    def set_mappings(self, mappings: Iterable[PciMapping]) -> None:
        """Every cluster-wide PCI resource mapping (``/cluster/mapping/pci``)."""
        touched = set(self._mapped)
        self.mappings = {mapping.id: mapping for mapping in mappings}
        self._mapped = {}
        for mapping in self.mappings.values():
            self.gpu.mapping_column(mapping.id)
            for entry in mapping.map:
                self._mapped.setdefault(entry.node, []).append((mapping.id, entry))
        for node in touched | set(self._mapped):
            if node in self.index:
                self._refresh_gpus(self.index[node])
        self.gpu.epoch += 1
        self._changed()

    def remove_node(self, node: str) -> None:
        """Forget a node that left the cluster (its row stays, empty and absent)."""
        i = self.index.get(node)
        if i is None:
            return
        for reservation in self._nodes[i].reservations.values():
            if self.locations.get(reservation.vmid) == i:
                del self.locations[reservation.vmid]
        self._nodes[i] = _Node()
        self._present_total -= bool(self.present[i])
        self.present[i] = False
        for column in (self.cpus, self.vcpu_total, self.vcpu_used, self.cpu_load):
            column[i] = 0.0
        self.mem_total[i] = self.mem_used[i] = self.mem_measured[i] = 0
        self.guests[i] = 0
        self.cpu_flags[i] = 0
        self.storage[i] = 0
        self._refresh_gpus(i)
        self.gpu.epoch += 1
        self._update_free(i)
        self._update_schedulable(i)
        self._changed()

    # Reservations -------------------------------------------------------------------------

    def set_reservations(self, node: str, reservations: Iterable[Reservation]) -> None:
        """Replace everything held on ``node`` (an allocations document was read or changed)."""
        i = self.row(node)
        held = self._nodes[i].reservations
        for reservation in held.values():
            if self.locations.get(reservation.vmid) == i:
                del self.locations[reservation.vmid]
        held.clear()
        for reservation in reservations:
            held[reservation.key] = reservation
        self._recount(i)
        self._refresh_gpus(i)

    def reserve(self, node: str | int, reservation: Reservation) -> None:
        """Hold resources on a node for one guest (a tentative placement or a new claim)."""
        i = node if isinstance(node, int) else self.row(node)
        held = self._nodes[i].reservations
        if reservation.key in held:
            raise ValueError(f"reservation {reservation.key} is already held")
        held[reservation.key] = reservation
        resources = reservation.resources
        self.vcpu_used[i] += resources.vcpus
        self.mem_used[i] += resources.memory
        self.guests[i] += 1
        self.locations[reservation.vmid] = i
        self._update_free(i)
        fitted = reservation.gpu_applied or apply_gpu_requests(
            self.gpu, i, resources.gpus, self._mapped.get(self.names[i], ())
        )
        if not fitted:
            self._gpu_failed.setdefault(i, set()).add(reservation.key)

    def overcommitted(self, node: str | int) -> bool:
        """Whether what is held on the node exceeds what it has, in any resource."""
        i = node if isinstance(node, int) else self.index[node]
        gpu = self.gpu
        return bool(
            self.vcpu_free[i] < 0
            or self.mem_free[i] < 0
            or self._gpu_failed.get(i)
            or (gpu.dev_free[i] < 0).any()
            or (gpu.mdev_free[i] < 0).any()
            or (gpu.map_free[i] < 0).any()
        )

    def holds(self, node: str | int, key: str) -> bool:
        """Whether the node holds everything reserved, in the resources reservation ``key`` uses.

        A claim is only committed when this holds with the claim counted: a shortage in a
        resource it does not use (a device the broker stopped offering) does not block it.
        """
        i = node if isinstance(node, int) else self.index[node]
        reservation = self._nodes[i].reservations.get(key)
        if reservation is None or self.vcpu_free[i] < 0 or self.mem_free[i] < 0:
            return False
        if key in self._gpu_failed.get(i, ()):
            return False
        gpu = self.gpu
        for request in reservation.resources.gpus:
            short = [
                gpu.dev_free[i, column] < 0
                for device, column in gpu.devices.index.items()
                if device[0] == request.kind.value
            ]
            if request.mapping is not None:
                short.append(gpu.map_free[i, gpu.mapping_ids.index[request.mapping]] < 0)
            if request.mdev_type is not None:
                short.append(gpu.mdev_free[i, gpu.mdev_types.index[request.mdev_type]] < 0)
            if any(short):
                return False
        return True

    def release(self, node: str | int, key: str) -> Reservation | None:
        """Give back what a reservation held; returns it, or None if it was not held."""
        i = node if isinstance(node, int) else self.index.get(node)
        if i is None:
            return None
        reservation = self._nodes[i].reservations.pop(key, None)
        if reservation is None:
            return None
        if self.locations.get(reservation.vmid) == i:
            del self.locations[reservation.vmid]
        self._recount(i)
        if reservation.resources.gpus and not reservation.gpu_applied:
            self._refresh_gpus(i)
        return reservation

    def reservations(self, node: str | int) -> list[Reservation]:
        """What is held on a node now."""
        i = node if isinstance(node, int) else self.index.get(node)
        return [] if i is None else list(self._nodes[i].reservations.values())

    def capacity(self, node: str | int) -> NodeCapacity | None:
        """The capacity a node last published."""
        i = node if isinstance(node, int) else self.index.get(node)
        return None if i is None else self._nodes[i].capacity

    # Aggregates ---------------------------------------------------------------------------

    def live(self) -> NDArray[np.intp]:
        """Rows of every present node."""
        return np.flatnonzero(self.present[: self.size])

    def present_count(self) -> int:
        """How many nodes are present."""
        return self._present_total

    def largest(self, column: str) -> float:
        """The largest value of a capacity column over present nodes, cached per epoch."""
        cached = self._max_cache.get(column)
        if cached is not None and cached[0] == self.epoch:
            return cached[1]
        values = getattr(self, column)[: self.size][self.present[: self.size]]
        largest = float(values.max()) if values.size else 0.0
        self._max_cache[column] = (self.epoch, largest)
        return largest

    # Derivations --------------------------------------------------------------------------

    def _changed(self) -> None:
        self.epoch += 1

    def _update_free(self, i: int) -> None:
        self.vcpu_free[i] = self.vcpu_total[i] - self.vcpu_used[i]
        self.mem_free[i] = self.mem_total[i] - self.mem_used[i]

    def _update_schedulable(self, i: int) -> None:
        node = self._nodes[i]
        self.schedulable[i] = bool(self.present[i]) and node.online and not node.maintenance

    def _recount(self, i: int) -> None:
        held = self._nodes[i].reservations.values()
        self.vcpu_used[i] = sum(r.resources.vcpus for r in held)
        self.mem_used[i] = sum(r.resources.memory for r in held)
        self.guests[i] = len(held)
        for reservation in held:
            self.locations[reservation.vmid] = i
        self._update_free(i)

    def _refresh_gpus(self, i: int) -> None:
        node = self._nodes[i]
        mapped = self._mapped.get(self.names[i], ())
        self.gpu.load(i, node.inventory, mapped)
        failed = set()
        for reservation in node.reservations.values():
            if reservation.gpu_applied or not reservation.resources.gpus:
                continue
            gpus = reservation.resources.gpus
            if not apply_gpu_requests(self.gpu, i, gpus, mapped):
                failed.add(reservation.key)
        if failed:
            self._gpu_failed[i] = failed
        else:
            self._gpu_failed.pop(i, None)

    def mig_codes(self, i: int) -> list[int]:
        """The MIG state codes of a node's GPUs (``NO_GPU`` for empty columns)."""
        return [int(code) for code in self.gpu.mig[i] if code != NO_GPU]
