"""NVML through nvidia-ml-py, loaded only where an NVIDIA driver is present.

Every call runs in a worker thread (the broker's Host wraps them); MIG mode is only read, never
changed: switching it needs an idle GPU and often a reset, which is the operator's decision.
"""

from __future__ import annotations

import ctypes
import threading
from types import ModuleType
from typing import Any

from rucher.gpu.drivers.interface import NvmlError, NvmlGpu
from rucher.proto.gpu import MigInstance, MigPlacement, MigProfile, VgpuType

MIG_PREFIX = "MIG "
MAX_PLACEMENTS = 16
MAX_INSTANCES = 16


def load_pynvml() -> ModuleType | None:
    """Pynvml initialised against the host's driver, or None without one."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None  # no libnvidia-ml, or no driver loaded: a host without NVIDIA GPUs
    library: ModuleType = pynvml
    return library


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pci_address(bus_id: str) -> str:
    """NVML's ``00000000:41:00.0`` as the kernel spells it (``0000:41:00.0``)."""
    domain, _, rest = bus_id.lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}"


class PynvmlApi:
    """The broker's NVML operations over an initialised pynvml module."""

    def __init__(self, library: ModuleType) -> None:
        self.nvml: Any = library
        self._lock = threading.Lock()

    def _call(self, name: str, *args: Any) -> Any:
        try:
            with self._lock:
                return getattr(self.nvml, name)(*args)
        except self.nvml.NVMLError as err:
            raise NvmlError(int(err.value), str(err)) from err

    def _handles(self) -> dict[str, Any]:
        handles = {}
        for index in range(self._call("nvmlDeviceGetCount")):
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            info = self._call("nvmlDeviceGetPciInfo", handle)
            handles[pci_address(_text(info.busId))] = handle
        return handles

    def _handle(self, address: str) -> Any:
        found = self._handles().get(address)
        if found is None:
            raise NvmlError(2, f"NVML has no GPU at {address}")
        return found

    def driver_version(self) -> str:
        """The NVIDIA driver's version."""
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def gpus(self) -> list[NvmlGpu]:
        """Every GPU NVML sees."""
        found = []
        for address, handle in sorted(self._handles().items()):
            try:
                current, pending = self._call("nvmlDeviceGetMigMode", handle)
            except NvmlError:
                current = pending = 0  # MIG not supported by this model
            found.append(
                NvmlGpu(
                    address=address,
                    name=_text(self._call("nvmlDeviceGetName", handle)),
                    uuid=_text(self._call("nvmlDeviceGetUUID", handle)),
                    memory=int(self._call("nvmlDeviceGetMemoryInfo", handle).total),
                    mig_current=bool(current),
                    mig_pending=bool(pending),
                )
            )
        return found

    def mig_profiles(self, address: str) -> list[MigProfile]:
        """The GPU-instance profiles NVML reports, with their possible placements."""
        handle = self._handle(address)
        profiles = []
        for index in range(self.nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            try:
                info = self._call("nvmlDeviceGetGpuInstanceProfileInfo", handle, index)
            except NvmlError:
                continue  # this profile index does not exist on this model
            if info.instanceCount == 0:
                continue
            placements = (self.nvml.c_nvmlGpuInstancePlacement_t * MAX_PLACEMENTS)()
            count = ctypes.c_uint(MAX_PLACEMENTS)
            self._call(
                "nvmlDeviceGetGpuInstancePossiblePlacements",
                handle,
                info.id,
                placements,
                ctypes.byref(count),
            )
            profiles.append(
                MigProfile(
                    profile_id=int(info.id),
                    name=_text(info.name).removeprefix(MIG_PREFIX),
                    slices=int(info.sliceCount),
                    max_instances=int(info.instanceCount),
                    memory=int(info.memorySizeMB) << 20,
                    multiprocessors=int(info.multiprocessorCount),
                    placements=tuple(
                        MigPlacement(start=int(p.start), size=int(p.size))
                        for p in placements[: count.value]
                    ),
                )
            )
        return profiles

    def _gpu_instances(self, handle: Any, profile_id: int) -> list[Any]:
        instances = (self.nvml.c_nvmlGpuInstance_t * MAX_INSTANCES)()
        count = ctypes.c_uint(0)
        self._call("nvmlDeviceGetGpuInstances", handle, profile_id, instances, ctypes.byref(count))
        return list(instances[: count.value])

    def _compute_instances(self, gpu_instance: Any) -> list[Any]:
        found = []
        for profile in range(self.nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
            instances = (self.nvml.c_nvmlComputeInstance_t * MAX_INSTANCES)()
            count = ctypes.c_uint(0)
            try:
                self._call(
                    "nvmlGpuInstanceGetComputeInstances",
                    gpu_instance,
                    profile,
                    instances,
                    ctypes.byref(count),
                )
            except NvmlError:
                continue
            found.extend(instances[: count.value])
        return found

    def mig_instances(self, address: str) -> list[MigInstance]:
        """The GPU instances that exist, each with its first compute instance."""
        handle = self._handle(address)
        found = []
        for profile in self.mig_profiles(address):
            for gpu_instance in self._gpu_instances(handle, profile.profile_id):
                info = self._call("nvmlGpuInstanceGetInfo", gpu_instance)
                computes = self._compute_instances(gpu_instance)
                compute = (
                    int(self._call("nvmlComputeInstanceGetInfo", computes[0]).id)
                    if computes
                    else None
                )
                found.append(
                    MigInstance(
                        gpu_instance_id=int(info.id),
                        profile_id=int(info.profileId),
                        placement=MigPlacement(
                            start=int(info.placement.start), size=int(info.placement.size)
                        ),
                        compute_instance_id=compute,
                    )
                )
        return sorted(found, key=lambda i: i.gpu_instance_id)

    def vgpu_types(self, address: str) -> list[VgpuType]:
        """The vGPU types the host driver supports on the GPU, and which can be created now."""
        handle = self._handle(address)
        try:
            supported = list(self._call("nvmlDeviceGetSupportedVgpus", handle))
        except NvmlError:
            return []  # no vGPU host driver (NVML answers "not supported")
        try:
            creatable = {int(t) for t in self._call("nvmlDeviceGetCreatableVgpus", handle)}
        except NvmlError:
            creatable = set()
        return [
            VgpuType(
                type_id=int(type_id),
                name=_text(self._call("nvmlVgpuTypeGetName", type_id)),
                vgpu_class=_text(self._call("nvmlVgpuTypeGetClass", type_id)),
                framebuffer=int(self._call("nvmlVgpuTypeGetFramebufferSize", type_id)),
                max_instances=int(self._call("nvmlVgpuTypeGetMaxInstances", handle, type_id)),
                creatable=int(type_id) in creatable,
            )
            for type_id in supported
        ]

    def _gpu_instance(self, address: str, gpu_instance: int) -> Any:
        return self._call("nvmlDeviceGetGpuInstanceById", self._handle(address), gpu_instance)

    def create_gpu_instance(self, address: str, profile_id: int, placement: MigPlacement) -> int:
        """Create a GPU instance at ``placement``; its id."""
        where = self.nvml.c_nvmlGpuInstancePlacement_t(placement.start, placement.size)
        created = self._call(
            "nvmlDeviceCreateGpuInstanceWithPlacement", self._handle(address), profile_id, where
        )
        return int(self._call("nvmlGpuInstanceGetInfo", created).id)

    def create_compute_instance(self, address: str, gpu_instance: int) -> int:
        """Create the compute instance spanning the whole GPU instance; its id."""
        handle = self._gpu_instance(address, gpu_instance)
        for profile in reversed(range(self.nvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT)):
            try:
                info = self._call(
                    "nvmlGpuInstanceGetComputeInstanceProfileInfo",
                    handle,
                    profile,
                    self.nvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                )
            except NvmlError:
                continue
            created = self._call("nvmlGpuInstanceCreateComputeInstance", handle, info.id)
            return int(self._call("nvmlComputeInstanceGetInfo", created).id)
        raise NvmlError(3, "no compute-instance profile fits the GPU instance")

    def destroy_compute_instance(self, address: str, gpu_instance: int, compute: int) -> None:
        """Destroy a compute instance."""
        handle = self._gpu_instance(address, gpu_instance)
        instance = self._call("nvmlGpuInstanceGetComputeInstanceById", handle, compute)
        self._call("nvmlComputeInstanceDestroy", instance)

    def destroy_gpu_instance(self, address: str, gpu_instance: int) -> None:
        """Destroy a GPU instance."""
        self._call("nvmlGpuInstanceDestroy", self._gpu_instance(address, gpu_instance))
