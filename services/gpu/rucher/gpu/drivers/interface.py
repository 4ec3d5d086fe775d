"""What the broker needs from a host: PCI sysfs access and the NVML operations it uses.

Both are synchronous (the kernel and NVML answer in microseconds to milliseconds) and are called
through ``asyncio.to_thread`` by :class:`rucher.gpu.host.Host`. Paths are relative to the sysfs
root (``bus/pci/devices/0000:41:00.0/vendor``), so a test points the broker at a fake tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rucher.proto.gpu import MigInstance, MigPlacement, MigProfile, VgpuType


class Sysfs(Protocol):
    """Read and write sysfs attributes; writes fail with ``OSError`` as the kernel's do."""

    def read(self, path: str) -> str | None:
        """An attribute's value without the trailing newline; None when it does not exist."""
        ...

    def write(self, path: str, value: str) -> None:
        """Write an attribute (``bind``, ``driver_override``, an mdev type's ``create``)."""
        ...

    def listdir(self, path: str) -> list[str]:
        """The names in a directory, sorted; empty when it does not exist."""
        ...

    def link(self, path: str) -> str | None:
        """The last component of a symbolic link's target (a driver's or group's name)."""
        ...


class NvmlError(Exception):
    """An NVML call failed; ``code`` is NVML's return code (3 not supported, 23 no resources)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


NVML_NOT_SUPPORTED = 3
NVML_INSUFFICIENT_RESOURCES = 23


@dataclass(frozen=True)
class NvmlGpu:
    """What NVML says about one GPU."""

    address: str
    name: str
    uuid: str
    memory: int
    mig_current: bool
    mig_pending: bool


class Nvml(Protocol):
    """The NVML operations the broker uses (nvidia-ml-py on a real host)."""

    def driver_version(self) -> str:
        """The NVIDIA driver's version."""
        ...

    def gpus(self) -> list[NvmlGpu]:
        """Every GPU NVML sees."""
        ...

    def mig_profiles(self, address: str) -> list[MigProfile]:
        """The GPU's GPU-instance profiles with their legal placements (empty without MIG)."""
        ...

    def mig_instances(self, address: str) -> list[MigInstance]:
        """The GPU instances that exist, each with its first compute instance."""
        ...

    def vgpu_types(self, address: str) -> list[VgpuType]:
        """The vGPU types of the GPU (empty without the vGPU host driver)."""
        ...

    def create_gpu_instance(self, address: str, profile_id: int, placement: MigPlacement) -> int:
        """Create a GPU instance at ``placement``; its id."""
        ...

    def create_compute_instance(self, address: str, gpu_instance: int) -> int:
        """Create the compute instance using the whole GPU instance; its id."""
        ...

    def destroy_compute_instance(self, address: str, gpu_instance: int, compute: int) -> None:
        """Destroy a compute instance."""
        ...

    def destroy_gpu_instance(self, address: str, gpu_instance: int) -> None:
        """Destroy a GPU instance (its compute instances must be gone)."""
        ...
