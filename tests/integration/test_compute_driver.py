"""The libvirt driver against a real libvirtd: the test guest under TCG, config to power-off."""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rucher.bus import RucherError
from rucher.compute.domain_xml import DomainSpec, HostFacts, domain_name, domain_xml
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode
from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

pytest.importorskip("libvirt")

from rucher.compute.drivers.libvirt import LibvirtHypervisor, kvm_usable

VMID = 990_001


async def _eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _config(image: GuestImage) -> dict[str, str]:
    return {
        "name": "driver-test",
        "memory": "192",
        "serial0": "socket",
        "vga": "serial0",
        "net0": "virtio=BC:24:11:00:00:09,bridge=vmbr0",
        "args": f"-kernel {image.kernel} -initrd {image.initrd} -append '{image.cmdline}'",
    }


async def test_a_guest_boots_reports_and_shuts_down_gracefully(libvirtd, guest_image, tmp_path):
    hypervisor = LibvirtHypervisor(libvirtd, kvm=kvm_usable())
    name = domain_name(VMID)
    facts = HostFacts(kvm=hypervisor.kvm, console_dir=str(tmp_path))
    console = Path(tmp_path, f"{VMID}-serial0.log")
    await hypervisor.define(domain_xml(DomainSpec(vmid=VMID, config=_config(guest_image)), facts))
    try:
        assert (await hypervisor.info(name)).state is PowerState.STOPPED
        await hypervisor.start(name)
        running = await hypervisor.info(name)
        assert running.state is PowerState.RUNNING
        assert running.max_memory == 192 * 1024 * 1024

        async def booted() -> bool:
            return guest_image.banner in await asyncio.to_thread(_read, console)

        assert await _eventually(booted, 60), await asyncio.to_thread(_read, console)
        await hypervisor.suspend(name)
        assert (await hypervisor.info(name)).state is PowerState.PAUSED
        await hypervisor.resume(name)
        await hypervisor.shutdown(name)

        async def stopped() -> bool:
            return (await hypervisor.info(name)).state is PowerState.STOPPED

        assert await _eventually(stopped, 30)
        assert "powering off" in await asyncio.to_thread(_read, console)
        assert name in [domain.name for domain in await hypervisor.domains()]
    finally:
        await hypervisor.stop(name)
        await hypervisor.undefine(name)
    assert await hypervisor.info(name) is None


async def test_a_missing_domain_is_not_found(libvirtd):
    hypervisor = LibvirtHypervisor(libvirtd, kvm=False)
    with pytest.raises(RucherError) as caught:
        await hypervisor.start(domain_name(VMID + 1))
    assert caught.value.code is ErrorCode.NOT_FOUND
    await hypervisor.undefine(domain_name(VMID + 1))  # absent: nothing to do, no error


def test_kvm_needs_hardware_virtualisation_not_just_the_device(tmp_path):
    cpuinfo, device = tmp_path / "cpuinfo", tmp_path / "kvm"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 hypervisor\n")
    device.touch()
    assert not kvm_usable(cpuinfo, device)
    cpuinfo.write_text("processor : 0\nflags : fpu vmx sse2\n")
    assert kvm_usable(cpuinfo, device)
    device.unlink()
    assert not kvm_usable(cpuinfo, device)
