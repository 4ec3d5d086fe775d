"""The libvirtd that ops/libvirt starts boots the test guest, whose init powers off on ACPI."""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

libvirt = pytest.importorskip("libvirt")


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_guest_boots_prints_and_powers_off_on_acpi(libvirtd, guest_image: GuestImage, tmp_path):
    console = tmp_path / "console.log"
    xml = f"""<domain type='qemu'><name>rucher-test-acpi</name><memory unit='MiB'>192</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{guest_image.kernel}</kernel>
        <initrd>{guest_image.initrd}</initrd><cmdline>{guest_image.cmdline}</cmdline></os>
      <features><acpi/></features>
      <devices><serial type='file'><source path='{console}'/><target port='0'/></serial></devices>
    </domain>"""
    connection = libvirt.open(libvirtd)
    domain = connection.createXML(xml)
    try:
        assert _wait(lambda: guest_image.banner in _read(console), 60), _read(console)
        domain.shutdown()
        assert _wait(lambda: not _alive(connection, "rucher-test-acpi"), 30)
        assert "powering off" in _read(console)
    finally:
        if _alive(connection, "rucher-test-acpi"):
            domain.destroy()
        connection.close()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _alive(connection, name: str) -> bool:
    return name in [domain.name() for domain in connection.listAllDomains()]


GOLDEN = Path(__file__).parents[1] / "unit" / "golden" / "compute"


@pytest.mark.parametrize("golden", sorted(path.name for path in GOLDEN.glob("*.xml")))
def test_golden_domains_are_accepted_by_libvirtd(libvirtd, golden):
    connection = libvirt.open(libvirtd)
    try:
        domain = connection.defineXML((GOLDEN / golden).read_text())
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        connection.close()
