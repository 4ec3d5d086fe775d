"""Proxmox config -> libvirt domain XML, compared with golden files (tests/unit/golden/compute).

Regenerate after a deliberate change: RUCHER_UPDATE_GOLDEN=1 pytest on this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rucher.compute.domain_xml import (
    DomainConfigError,
    DomainSpec,
    HostFacts,
    domain_name,
    domain_xml,
    vmid_of,
)

GOLDEN = Path(__file__).parent / "golden" / "compute"
RAW_DISK = "<disk type='file'><driver name='qemu' type='{fmt}'/><source file='{path}'/></disk>"

CASES: dict[str, tuple[DomainSpec, HostFacts]] = {
    "minimal": (DomainSpec(vmid=100, config={}), HostFacts()),
    "proxmox-default": (
        DomainSpec(
            vmid=101,
            config={
                "name": "web01", "memory": "2048", "balloon": "1024", "cores": "2",
                "sockets": "2", "numa": "1", "cpu": "x86-64-v2-AES", "ostype": "l26",
                "scsihw": "virtio-scsi-single", "boot": "order=scsi0;ide2;net0",
                "scsi0": "local:101/vm-101-disk-0.qcow2,iothread=1,size=32G,discard=on,ssd=1",
                "ide2": "local:iso/debian.iso,media=cdrom",
                "net0": "virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1,tag=20,rate=12.5",
                "agent": "1", "onboot": "1", "tags": "prod;web", "description": "front end",
            },
            disks={
                "scsi0": RAW_DISK.format(fmt="qcow2", path="/pool/images/101/vm-101-disk-0.qcow2"),
                "ide2": RAW_DISK.format(fmt="raw", path="/pool/template/iso/debian.iso"),
            },
        ),
        HostFacts(kvm=True),
    ),
    "windows-ovmf-q35": (
        DomainSpec(
            vmid=102,
            config={
                "ostype": "win11", "bios": "ovmf", "machine": "pc-q35-7.2+pve0", "cpu": "host",
                "memory": "4096", "balloon": "0", "vga": "qxl", "sata0": "none,media=cdrom",
                "virtio0": "local:102/vm-102-disk-0.raw,cache=writeback,mbps_rd=100,iops_wr=500",
                "net0": "e1000=bc:24:11:00:00:02,bridge=vmbr1,link_down=1", "boot": "cdn",
            },
            disks={"virtio0": RAW_DISK.format(fmt="raw", path="/pool/102/vm-102-disk-0.raw")},
        ),
        HostFacts(kvm=True),
    ),
    "test-guest-tcg": (
        DomainSpec(
            vmid=103,
            config={
                "memory": "192", "serial0": "socket", "vga": "serial0",
                "net0": "virtio,bridge=vmbr0",
                "args": "-kernel /g/vmlinux -initrd /g/initrd -append 'console=ttyS0 quiet'",
            },
        ),
        HostFacts(console_dir="/run/rucher/console"),
    ),
    "cloudinit": (
        DomainSpec(
            vmid=104,
            config={
                "name": "ci01", "memory": "256", "ide2": "local:cloudinit", "ciuser": "debian",
                "sshkeys": "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIJ%20me%40laptop",
                "ipconfig0": "ip=dhcp", "net0": "virtio=BC:24:11:00:01:04,bridge=vmbr0",
            },
        ),
        HostFacts(cloudinit_dir="/var/lib/rucher/cloudinit"),
    ),
    "aarch64-kernel": (
        DomainSpec(
            vmid=105,
            config={
                "arch": "aarch64", "memory": "256", "serial0": "socket", "vga": "serial0",
                "net0": "virtio=BC:24:11:00:01:05,bridge=vmbr0",
                "args": "-kernel /g/vmlinuz-arm64 -append 'console=ttyAMA0'",
            },
        ),
        HostFacts(kvm=True, console_dir="/run/rucher/console"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_domain_xml_matches_golden(name):
    spec, facts = CASES[name]
    produced = domain_xml(spec, facts)
    golden = GOLDEN / f"{name}.xml"
    if os.environ.get("RUCHER_UPDATE_GOLDEN"):
        golden.write_text(produced)
    assert produced == golden.read_text()


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"memory": "lots"}, "memory"),
        ({"memory": "512", "balloon": "1024"}, "balloon"),
        ({"cores": "0"}, "cores"),
        ({"cores": "2", "vcpus": "3"}, "vcpus"),
        ({"net0": "virtio,bridge=vmbr0,colour=red"}, "net0"),
        ({"net0": "virtio,bridge=vmbr0,tag=lots"}, "net0"),
        ({"scsi0": "local:100/vm-100-disk-0.raw"}, "scsi0"),
        ({"ide2": "local:iso/x.iso,media=floppy"}, "ide2"),
        ({"bios": "uefi"}, "bios"),
        ({"machine": "pc;rm -rf"}, "machine"),
        ({"boot": "cdx"}, "boot"),
        ({"scsi0": "none,media=cdrom", "scsihw": "buslogic"}, "scsihw"),
        ({"args": "-device foo"}, "args"),
        ({"serial0": "tcp:1234"}, "serial0"),
        ({"hostpci0": "0000:01:00.0,colour=blue"}, "hostpci0"),
        ({"vga": "matrox"}, "vga"),
        ({"arch": "riscv64"}, "arch"),
        ({"arch": "aarch64", "ide2": "none,media=cdrom"}, "ide2"),
        ({"ide2": "local:cloudinit", "ipconfig0": "ip=10.0.0.5", "net0": "virtio"}, "ipconfig0"),
        (
            {"ide2": "local:cloudinit", "ipconfig0": "ip=dhcp,gw=10.0.0.1", "net0": "e1000"},
            "ipconfig0",
        ),
        ({"ide2": "local:cloudinit", "ipconfig1": "ip=dhcp", "net0": "virtio"}, "ipconfig1"),
        ({"ide2": "local:cloudinit", "ipconfig0": "ip6=10.0.0.5/24", "net0": "e1000"}, "ipconfig0"),
        ({"ide2": "local:cloudinit", "sshkeys": "not%20a%20key"}, "sshkeys"),
        ({"ide2": "local:cloudinit", "ciuser": "Root User"}, "ciuser"),
        ({"ide2": "local:cloudinit", "nameserver": "dns.example"}, "nameserver"),
        ({"ide2": "local:cloudinit", "searchdomain": "bad domain!"}, "searchdomain"),
        ({"ide2": "local:cloudinit", "citype": "configdrive2"}, "citype"),
        ({"ipconfig0": "ip=300.1.1.1/24", "net0": "virtio"}, "ipconfig0"),
    ],
)
def test_bad_values_name_their_field(config, field):
    with pytest.raises(DomainConfigError) as caught:
        domain_xml(DomainSpec(vmid=100, config=config), HostFacts())
    assert caught.value.field == field


def test_kvm_only_when_the_host_has_it():
    spec = DomainSpec(vmid=100, config={"cpu": "host"})
    assert '<domain xmlns:rucher="https://rucher.dev/xmlns/guest/1" type="qemu">' in domain_xml(
        spec, HostFacts(kvm=False)
    )
    kvm = domain_xml(spec, HostFacts(kvm=True))
    assert 'type="kvm"' in kvm
    assert 'mode="host-passthrough"' in kvm


def test_an_emulated_architecture_is_never_kvm():
    produced = domain_xml(DomainSpec(vmid=100, config={"arch": "aarch64"}), HostFacts(kvm=True))
    assert 'type="qemu"' in produced
    assert '<type arch="aarch64" machine="virt">hvm</type>' in produced
    assert "<acpi />" not in produced
    native = domain_xml(DomainSpec(vmid=100, config={"arch": "x86_64"}), HostFacts(kvm=True))
    assert 'type="kvm"' in native


def test_a_cloudinit_drive_points_at_the_seed_image():
    config = {"scsi1": "local:vm-100-cloudinit,media=cdrom", "ciuser": "ops"}
    produced = domain_xml(DomainSpec(vmid=100, config=config), HostFacts(cloudinit_dir="/ci"))
    assert '<source file="/ci/100-cidata.iso" />' in produced
    assert '<rucher:cloudinit image="/ci/100-cidata.iso">' in produced
    without_drive = domain_xml(DomainSpec(vmid=100, config={"ciuser": "ops"}), HostFacts())
    assert "cloudinit" not in without_drive


def test_domain_names_round_trip():
    assert vmid_of(domain_name(4242)) == 4242
    assert vmid_of("ubuntu") is None
    assert vmid_of("rucher-abc") is None


def test_smbios_uuid_is_kept():
    spec = DomainSpec(vmid=100, config={"smbios1": "uuid=0f8c6f7e-1111-4222-8333-444455556666"})
    assert "<uuid>0f8c6f7e-1111-4222-8333-444455556666</uuid>" in domain_xml(spec, HostFacts())


def test_the_formats_file_matches_the_proxmox_schema():
    root = Path(__file__).parents[2]
    script = root / "ops" / "gen_compute_formats.py"
    result = subprocess.run([sys.executable, str(script), "--check"], check=False)
    assert result.returncode == 0, "stale: run ops/gen_compute_formats.py"
