"""GPU columns of the cluster view: whole devices, mdev instances, MIG states, PCI mappings.

Each node's row is loaded from its GPU broker's inventory, then the GPU requests of the
reservations the inventory does not show yet are taken from it, the way the broker would
satisfy them (MIG instances at the placement that loses the least).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from rucher.placement.bits import Interner
from rucher.placement.mig import NO_GPU, MigCatalog
from rucher.proto.gpu import GpuInventory, GpuKind, PciDevice, PciMappingEntry
from rucher.proto.scheduler import GpuRequest

ANY = "*"
DeviceKey = tuple[str, str, str]  # (kind, vendor id or ANY, device id or ANY)


def device_keys(kind: GpuKind, vendor: str | None, device: str | None) -> DeviceKey:
    """The column key a request for ``kind`` of this vendor and device reads."""
    return (kind.value, vendor or ANY, device or ANY)


def _keys_of(kind: GpuKind, device: PciDevice) -> tuple[DeviceKey, ...]:
    vendor, model = device.vendor_id, device.device_id
    k = kind.value
    return ((k, ANY, ANY), (k, vendor, ANY), (k, ANY, model), (k, vendor, model))


def whole_kind(device: PciDevice) -> GpuKind | None:
    """How a device can be handed out whole: a virtual function, a GPU, or not at all."""
    if device.physfn is not None:
        return GpuKind.VF
    if device.class_code.startswith("03") and not device.mig_enabled:
        return GpuKind.PASSTHROUGH
    return None


def _widen(array: NDArray[np.int16], columns: int) -> NDArray[np.int16]:
    if columns <= array.shape[1]:
        return array
    wider = np.zeros((array.shape[0], max(columns, 2 * array.shape[1])), dtype=array.dtype)
    wider[:, : array.shape[1]] = array
    return wider


class GpuRows:
    """The GPU columns: totals (what exists) and free counts (what is left) per node."""

    def __init__(self, rows: int) -> None:
        self.catalog = MigCatalog()
        self.devices: Interner[DeviceKey] = Interner()
        self.mdev_types: Interner[str] = Interner()
        self.mapping_ids: Interner[str] = Interner()
        self.epoch = 0  # grows when an inventory or the mappings change, not with reservations
        self.dev_total = np.zeros((rows, 4), dtype=np.int16)
        self.dev_free = np.zeros((rows, 4), dtype=np.int16)
        self.mdev_total = np.zeros((rows, 4), dtype=np.int16)
        self.mdev_free = np.zeros((rows, 4), dtype=np.int16)
        self.map_total = np.zeros((rows, 4), dtype=np.int16)
        self.map_free = np.zeros((rows, 4), dtype=np.int16)
        self.mig = np.zeros((rows, 1), dtype=np.int32)
        self.has_gpu = np.zeros(rows, dtype=np.bool_)

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` nodes."""
        for name in ("dev_total", "dev_free", "mdev_total", "mdev_free", "map_total", "map_free"):
            old = getattr(self, name)
            new = np.zeros((rows, old.shape[1]), dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        mig = np.zeros((rows, self.mig.shape[1]), dtype=np.int32)
        mig[: len(self.mig)] = self.mig
        self.mig = mig
        has_gpu = np.zeros(rows, dtype=np.bool_)
        has_gpu[: len(self.has_gpu)] = self.has_gpu
        self.has_gpu = has_gpu

    def device_column(self, key: DeviceKey) -> int:
        """The column of a device key, created on first sight."""
        column = self.devices.intern(key)
        self.dev_total = _widen(self.dev_total, column + 1)
        self.dev_free = _widen(self.dev_free, column + 1)
        return column

    def mdev_column(self, type_id: str) -> int:
        """The column of an mdev type, created on first sight."""
        column = self.mdev_types.intern(type_id)
        self.mdev_total = _widen(self.mdev_total, column + 1)
        self.mdev_free = _widen(self.mdev_free, column + 1)
        return column

    def mapping_column(self, mapping: str) -> int:
        """The column of a PCI mapping, created on first sight."""
        column = self.mapping_ids.intern(mapping)
        self.map_total = _widen(self.map_total, column + 1)
        self.map_free = _widen(self.map_free, column + 1)
        return column

    def load(
        self,
        i: int,
        inventory: GpuInventory | None,
        mapped: Sequence[tuple[str, PciMappingEntry]],
    ) -> None:
        """Fill row ``i`` from an inventory (an empty row when there is none)."""
        for array in (
            self.dev_total,
            self.dev_free,
            self.mdev_total,
            self.mdev_free,
            self.map_total,
            self.map_free,
            self.mig,
        ):
            array[i] = 0
        devices = inventory.devices if inventory is not None else ()
        by_address = {device.address: device for device in devices}
        mig_codes: list[int] = []
        for device in devices:
            kind = whole_kind(device)
            if kind is not None:
                free = device.lease_id is None
                for key in _keys_of(kind, device):
                    column = self.device_column(key)
                    self.dev_total[i, column] += 1
                    self.dev_free[i, column] += free
            if device.lease_id is None:
                for mdev in device.mdev_types:
                    column = self.mdev_column(mdev.type_id)
                    self.mdev_total[i, column] += mdev.available_instances
                    self.mdev_free[i, column] += mdev.available_instances
            if device.mig_enabled and device.mig_profiles:
                geometry = self.catalog.register(device.mig_profiles)
                names = {p.profile_id: p.name for p in device.mig_profiles}
                state = self.catalog.geometries[geometry].state_of(
                    (names[instance.profile_id], instance.placement)
                    for instance in device.mig_instances
                )
                mig_codes.append(self.catalog.code(geometry, state))
        if len(mig_codes) > self.mig.shape[1]:
            wider = np.zeros((self.mig.shape[0], len(mig_codes)), dtype=np.int32)
            wider[:, : self.mig.shape[1]] = self.mig
            self.mig = wider
        self.mig[i, : len(mig_codes)] = mig_codes
        self.has_gpu[i] = bool(self.dev_total[i].any() or self.mdev_total[i].any() or mig_codes)
        for mapping, entry in mapped:
            column = self.mapping_column(mapping)
            self.map_total[i, column] += 1
            found = by_address.get(entry.path)
            self.map_free[i, column] += found is not None and found.lease_id is None


def apply_gpu_requests(
    rows: GpuRows,
    i: int,
    requests: tuple[GpuRequest, ...],
    mapped: Sequence[tuple[str, PciMappingEntry]],
) -> bool:
    """Take what ``requests`` need from row ``i``; False when something did not fit."""
    fitted = True
    for request in requests:
        if request.mapping is not None:
            column = rows.mapping_column(request.mapping)
            rows.map_free[i, column] -= request.count
            fitted &= bool(rows.map_free[i, column] >= 0)
        if request.kind is GpuKind.MIG and request.mig_profile is not None:
            for _ in range(request.count):
                fitted &= _take_mig(rows, i, request.mig_profile)
        elif request.kind is GpuKind.MDEV and request.mdev_type is not None:
            column = rows.mdev_column(request.mdev_type)
            rows.mdev_free[i, column] -= request.count
            fitted &= bool(rows.mdev_free[i, column] >= 0)
        elif request.kind in (GpuKind.PASSTHROUGH, GpuKind.VF):
            vendor, device = request.vendor_id, request.device_id
            if request.mapping is not None:
                # The model the mapping names on this node decides which devices it takes.
                entry = next((e for m, e in mapped if m == request.mapping), None)
                if entry is not None:
                    vendor, device = entry.vendor_id, entry.device_id
            for _ in range(request.count):
                fitted &= _take_device(rows, i, request.kind, vendor, device)
    return fitted


def _take_device(
    rows: GpuRows, i: int, kind: GpuKind, vendor: str | None, device: str | None
) -> bool:
    best: DeviceKey | None = None
    best_free = 0
    for key in rows.devices.names:
        if key[0] != kind.value or ANY in key[1:]:
            continue
        if (vendor and key[1] != vendor) or (device and key[2] != device):
            continue
        free = int(rows.dev_free[i, rows.devices.index[key]])
        if free > best_free:
            best, best_free = key, free
    if best is None:
        return False
    for key in ((best[0], ANY, ANY), (best[0], best[1], ANY), (best[0], ANY, best[2]), best):
        rows.dev_free[i, rows.devices.index[key]] -= 1
    return True


def _take_mig(rows: GpuRows, i: int, profile: str) -> bool:
    position = rows.catalog.profiles.get(profile)
    if position is None:
        return False
    codes = rows.mig[i]
    losses = rows.catalog.tables.loss[position, codes]
    column = int(np.argmin(losses))
    if not np.isfinite(losses[column]) or codes[column] == NO_GPU:
        return False
    codes[column] = rows.catalog.tables.next[position, codes[column]]
    return True
