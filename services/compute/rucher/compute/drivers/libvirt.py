"""The libvirt driver: every libvirt call runs in ``asyncio.to_thread``, never on the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt  # type: ignore[import-untyped]

from rucher.bus import RucherError
from rucher.compute.drivers.interface import DomainInfo
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode

T = TypeVar("T")

STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}


def kvm_usable(cpuinfo: Path = Path("/proc/cpuinfo"), device: Path = Path("/dev/kvm")) -> bool:
    """Whether KVM really works: /dev/kvm alone lies on nested hosts without vmx/svm."""
    if not device.exists():
        return False
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"vmx", "svm"})


class LibvirtHypervisor:
    """Domains of one libvirtd (``qemu:///system`` by default)."""

    def __init__(self, uri: str, *, kvm: bool) -> None:
        self.uri = uri
        self.kvm = kvm
        self._connection: Any = None
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        with self._lock:
            if self._connection is None or not self._connection.isAlive():
                self._connection = libvirt.open(self.uri)
            return self._connection

    async def _call(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except libvirt.libvirtError as err:
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: {err.get_error_message()}") from err

    def _lookup(self, name: str) -> Any:
        try:
            return self._conn().lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain(self, name: str) -> Any:
        domain = self._lookup(name)
        if domain is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"domain {name} is not defined on this node")
        return domain

    async def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain."""
        await self._call(lambda: self._conn().defineXML(xml))

    async def undefine(self, name: str) -> None:
        """Remove a stopped domain's definition (and its NVRAM)."""

        def work() -> None:
            domain = self._lookup(name)
            if domain is not None:
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

        await self._call(work)

    async def start(self, name: str) -> None:
        """Start a defined domain."""
        await self._call(lambda: self._domain(name).create())

    async def stop(self, name: str) -> None:
        """Destroy (hard-stop) a running domain."""

        def work() -> None:
            domain = self._domain(name)
            if domain.isActive():
                domain.destroy()

        await self._call(work)

    async def shutdown(self, name: str) -> None:
        """ACPI power button."""
        await self._call(
            lambda: self._domain(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        )

    async def reboot(self, name: str) -> None:
        """ACPI reboot request."""
        await self._call(
            lambda: self._domain(name).reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        )

    async def reset(self, name: str) -> None:
        """Hardware reset."""
        await self._call(lambda: self._domain(name).reset(0))

    async def suspend(self, name: str) -> None:
        """Pause the vCPUs."""
        await self._call(lambda: self._domain(name).suspend())

    async def resume(self, name: str) -> None:
        """Resume paused vCPUs."""
        await self._call(lambda: self._domain(name).resume())

    def _info(self, domain: Any) -> DomainInfo:
        state, max_kib, kib, vcpus, cpu_time = domain.info()
        return DomainInfo(
            name=domain.name(),
            state=STATES.get(state, PowerState.STOPPED),
            memory=kib * 1024 if state in STATES else 0,
            max_memory=max_kib * 1024,
            vcpus=vcpus,
            cpu_time_ns=cpu_time,
        )

    async def info(self, name: str) -> DomainInfo | None:
        """State and counters of one domain."""

        def work() -> DomainInfo | None:
            domain = self._lookup(name)
            return None if domain is None else self._info(domain)

        return await self._call(work)

    async def domains(self) -> list[DomainInfo]:
        """Every domain of this libvirtd."""
        return await self._call(
            lambda: [self._info(domain) for domain in self._conn().listAllDomains()]
        )
