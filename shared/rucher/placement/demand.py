"""A placement request compiled against the view: column indexes, bitsets, node sets.

Compiling also refuses, at once and with the reason, what no node could ever satisfy: more
memory or vCPUs than the largest node has, a GPU profile, mdev type, storage or CPU flag that no
node offers, a mapping that does not exist, affinity rules that contradict each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rucher.placement.bits import bitset
from rucher.placement.gpus import device_keys
from rucher.placement.view import ClusterView
from rucher.proto.gpu import GpuKind
from rucher.proto.guest import GuestType
from rucher.proto.scheduler import AffinityKind, FilterOutcome, GpuRequest, PlacementSpec

GIB = 1 << 30
_NO_NODES: NDArray[np.intp] = np.zeros(0, dtype=np.intp)


class PlacementError(Exception):
    """No node can take the guest. ``impossible`` when none ever could, whatever it frees."""

    def __init__(
        self,
        message: str,
        *,
        impossible: bool,
        outcomes: tuple[FilterOutcome, ...] = (),
        field: str | None = None,
        examined: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.impossible = impossible
        self.outcomes = outcomes
        self.field = field
        self.examined = examined

    def details(self) -> dict[str, Any]:
        """Structured details for an error reply: the offending field and the filter outcomes."""
        details: dict[str, Any] = {"impossible": self.impossible, "examined": self.examined}
        if self.field:
            details["field"] = self.field
        if self.outcomes:
            details["filters"] = [
                {"filter": o.filter, "removed": o.removed, "remaining": o.remaining}
                for o in self.outcomes
            ]
        return details


@dataclass(frozen=True, slots=True)
class Demand:
    """What one guest needs, in the view's terms."""

    spec: PlacementSpec
    label: str
    vcpus: float
    memory: int
    arch: int
    flags: NDArray[np.uint64] | None
    storages: NDArray[np.uint64] | None
    devices: tuple[tuple[int, int], ...]
    mdevs: tuple[tuple[int, int], ...]
    migs: tuple[tuple[int, int], ...]
    mappings: tuple[tuple[int, int], ...]
    allowed: tuple[tuple[str, NDArray[np.intp]], ...]
    excluded: NDArray[np.intp]
    apart: NDArray[np.intp]
    preferred: NDArray[np.intp] | None
    priorities: NDArray[np.int32] | None

    @property
    def vmid(self) -> int:
        """The guest's VMID."""
        return self.spec.vmid


def label(spec: PlacementSpec) -> str:
    """How Proxmox names the guest in messages: ``VM 100`` or ``CT 100``."""
    return f"{'CT' if spec.guest_type is GuestType.LXC else 'VM'} {spec.vmid}"


def _impossible(message: str, field: str | None = None) -> PlacementError:
    return PlacementError(message, impossible=True, field=field)


def _rows(view: ClusterView, nodes: Iterable[str]) -> NDArray[np.intp]:
    found = sorted(
        {view.index[n] for n in nodes if n in view.index and view.present[view.index[n]]}
    )
    return np.array(found, dtype=np.intp)


def _largest_column(view: ClusterView, array: NDArray[np.int16], column: int) -> int:
    values = array[: view.size, column][view.present[: view.size]]
    return int(values.max()) if values.size else 0


def compile_demand(view: ClusterView, spec: PlacementSpec) -> Demand:
    """Compile ``spec`` for ``view``; raises :class:`PlacementError` when it can never fit."""
    name = label(spec)
    resources = spec.resources
    if view.present_count() == 0:
        raise _impossible(f"no node can run {name}: the cluster has no node")
    if resources.memory > view.largest("mem_total"):
        raise _impossible(
            f"{name} needs {resources.memory / GIB:.1f} GiB of memory, more than any node has "
            f"(largest: {view.largest('mem_total') / GIB:.1f} GiB)",
            "memory",
        )
    if resources.vcpus > view.largest("vcpu_total"):
        raise _impossible(
            f"{name} needs {resources.vcpus} vCPUs, more than any node offers "
            f"(largest: {view.largest('vcpu_total'):g})",
            "vcpus",
        )
    arch = view.archs.get(resources.arch.value)
    if arch is None:
        raise _impossible(f"no node has CPU architecture {resources.arch.value}", "arch")
    flags = None
    if resources.cpu_flags:
        missing = [flag for flag in resources.cpu_flags if flag not in view.flags]
        if missing:
            raise _impossible(f"no node has CPU flag {', '.join(sorted(missing))}", "cpu_flags")
        flags = bitset((view.flags.index[f] for f in resources.cpu_flags), view.cpu_flags.shape[1])
    storages = None
    if resources.storages:
        missing = [s for s in resources.storages if s not in view.storage_ids]
        if missing:
            raise _impossible(f"no node reaches storage {', '.join(sorted(missing))}", "storages")
        storages = bitset(
            (view.storage_ids.index[s] for s in resources.storages), view.storage.shape[1]
        )
    devices, mdevs, migs, mappings = _gpu_columns(view, spec, name)
    allowed, excluded, apart, preferred, priorities = _constraints(view, spec, name)
    return Demand(
        spec=spec,
        label=name,
        vcpus=float(resources.vcpus),
        memory=resources.memory,
        arch=arch,
        flags=flags,
        storages=storages,
        devices=devices,
        mdevs=mdevs,
        migs=migs,
        mappings=mappings,
        allowed=allowed,
        excluded=excluded,
        apart=apart,
        preferred=preferred,
        priorities=priorities,
    )


class _Columns:
    """The GPU, mdev, MIG and mapping columns a request reads, with the count it needs of each."""

    def __init__(self) -> None:
        self.devices: dict[int, int] = {}
        self.mdevs: dict[int, int] = {}
        self.migs: dict[int, int] = {}
        self.mappings: dict[int, int] = {}

    @staticmethod
    def add(counts: dict[int, int], column: int, count: int) -> None:
        counts[column] = counts.get(column, 0) + count


def _gpu_column(view: ClusterView, request: GpuRequest, columns: _Columns) -> None:
    gpu = view.gpu
    if request.mapping is not None:
        if request.mapping not in view.mappings:
            raise _impossible(f"unknown PCI mapping {request.mapping}", "gpus")
        columns.add(columns.mappings, gpu.mapping_ids.intern(request.mapping), request.count)
    if request.kind is GpuKind.MIG:
        if request.mig_profile is None:
            raise _impossible("a MIG request must name its profile", "gpus")
        row = gpu.catalog.profiles.get(request.mig_profile)
        if row is None:
            raise _impossible(f"unknown MIG profile {request.mig_profile}", "gpus")
        columns.add(columns.migs, row, request.count)
    elif request.kind is GpuKind.MDEV:
        if request.mdev_type is None and request.mapping is None:
            raise _impossible("an mdev request must name its type or a mapping", "gpus")
        if request.mdev_type is not None:
            column = gpu.mdev_types.get(request.mdev_type)
            if column is None:
                raise _impossible(f"no node offers mdev type {request.mdev_type}", "gpus")
            columns.add(columns.mdevs, column, request.count)
    elif request.mapping is None:
        key = device_keys(request.kind, request.vendor_id, request.device_id)
        found = gpu.devices.get(key)
        if found is None:
            model = ":".join(part for part in key[1:] if part != "*") or "GPU"
            raise _impossible(f"no node has a {model} device for {key[0]}", "gpus")
        columns.add(columns.devices, found, request.count)


def _gpu_columns(
    view: ClusterView, spec: PlacementSpec, name: str
) -> tuple[tuple[tuple[int, int], ...], ...]:
    columns = _Columns()
    for request in spec.resources.gpus:
        _gpu_column(view, request, columns)
    for column, count in columns.devices.items():
        if count > _largest_column(view, view.gpu.dev_total, column):
            raise _impossible(f"{name} needs {count} devices, more than any node has", "gpus")
    return (
        tuple(columns.devices.items()),
        tuple(columns.mdevs.items()),
        tuple(columns.migs.items()),
        tuple(columns.mappings.items()),
    )


def _constraints(
    view: ClusterView, spec: PlacementSpec, name: str
) -> tuple[
    tuple[tuple[str, NDArray[np.intp]], ...],
    NDArray[np.intp],
    NDArray[np.intp],
    NDArray[np.intp] | None,
    NDArray[np.int32] | None,
]:
    allowed: list[tuple[str, NDArray[np.intp]]] = []
    excluded = _rows(view, spec.exclude) if spec.exclude else _NO_NODES
    if spec.candidates:
        allowed.append(("candidates", _rows(view, spec.candidates)))
    preferred = priorities = None
    rule = spec.node_affinity
    if rule is not None:
        known = [(p.node, p.priority) for p in rule.nodes if p.node in view.index]
        known = [(n, p) for n, p in known if view.present[view.index[n]]]
        if rule.strict and not known:
            nodes = ", ".join(p.node for p in rule.nodes)
            raise _impossible(f"node-affinity: none of {nodes} is in the cluster", "node_affinity")
        if known:
            preferred = np.array([view.index[n] for n, _ in known], dtype=np.intp)
            priorities = np.array([p for _, p in known], dtype=np.int32)
            if rule.strict:
                allowed.append(("node-affinity", np.sort(preferred)))
    together = {
        v for r in spec.resource_affinity if r.affinity is AffinityKind.POSITIVE for v in r.vmids
    }
    apart_vmids = {
        v for r in spec.resource_affinity if r.affinity is AffinityKind.NEGATIVE for v in r.vmids
    }
    together.discard(spec.vmid)
    apart_vmids.discard(spec.vmid)
    both = together & apart_vmids
    if both:
        raise _impossible(
            f"resource-affinity: {name} must run both with and apart from "
            f"{', '.join(map(str, sorted(both)))}",
            "resource_affinity",
        )
    with_nodes = {view.locations[v] for v in together if v in view.locations}
    if len(with_nodes) > 1:
        where = ", ".join(sorted(view.names[i] for i in with_nodes))
        raise _impossible(
            f"resource-affinity: the guests {name} must run with are on different nodes ({where})",
            "resource_affinity",
        )
    apart = np.array(
        sorted({view.locations[v] for v in apart_vmids if v in view.locations}), dtype=np.intp
    )
    if with_nodes:
        target = next(iter(with_nodes))
        if target in set(apart.tolist()):
            raise _impossible(
                f"resource-affinity: {name} must run on {view.names[target]} with some guests "
                "and apart from others that run there",
                "resource_affinity",
            )
        allowed.append(("resource-affinity", np.array([target], dtype=np.intp)))
    remaining: set[int] | None = None
    for _, rows in allowed:
        remaining = set(rows.tolist()) if remaining is None else remaining & set(rows.tolist())
    if remaining is not None and not remaining - set(excluded.tolist()):
        raise _impossible(
            f"the node constraints of {name} leave no node (candidates, node-affinity, "
            "resource-affinity and exclusions contradict each other)",
            "resource_affinity" if with_nodes else "node_affinity",
        )
    return tuple(allowed), excluded, apart, preferred, priorities
