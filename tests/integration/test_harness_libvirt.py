"""The harness with a libvirtd per node: private state, peers over the bridge, crash and restart."""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from rucher.testing.harness import Harness
from rucher.testing.libvirt import GuestImage, guest_image  # noqa: F401 - fixture
from rucher.testing.netns import netns_pids
from rucher.testing.process import process_start_ticks

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def domain_xml(name: str, image: GuestImage) -> str:
    """A small direct-kernel-boot guest on the node's ``vmbr0``."""
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image.kernel}</kernel>
<initrd>{image.initrd}</initrd><cmdline>{image.cmdline}</cmdline></os><features><acpi/></features>
<devices><serial type='pty'/><interface type='bridge'><source bridge='vmbr0'/>
<model type='virtio'/></interface></devices></domain>"""


def qemu_pid(harness: Harness, node: str, name: str) -> int:
    """The QEMU process of domain ``name`` on ``node``, from the node's own pid folder."""
    return int((harness.node(node).libvirtd.qemu_pid_dir / f"{name}.pid").read_text())


def test_each_node_has_its_own_libvirtd_reachable_by_its_peers(harness_factory, guest_image):
    harness = harness_factory(nodes=2, libvirt=True)
    uuids = set()
    for node in harness.nodes:
        env = node.service_env("compute")
        assert env["RUCHER_LIBVIRT_URI"] == node.libvirtd.uri
        assert env["RUCHER_COMPUTE_MIGRATION_ADDRESS"] == node.address
        local = libvirt.open(node.libvirtd.uri)
        peer = libvirt.open(node.libvirtd.peer_uri)  # over the bridge, as another node would
        try:
            host = ET.fromstring(local.getCapabilities()).findtext("host/uuid")
            uuids.add(host)
            assert local.listAllDomains() == []
            assert peer.getURI() == node.libvirtd.peer_uri
        finally:
            local.close()
            peer.close()
        assert host == node.libvirtd.host_uuid
    assert len(uuids) == 2

    # A domain defined on n1 is n1's alone.
    n1 = libvirt.open(harness.node("n1").libvirtd.uri)
    n2 = libvirt.open(harness.node("n2").libvirtd.uri)
    try:
        n1.defineXML(domain_xml("harness-guest", guest_image)).create()
        assert [d.name() for d in n1.listAllDomains()] == ["harness-guest"]
        assert n2.listAllDomains() == []
    finally:
        n1.close()
        n2.close()
    pid = qemu_pid(harness, "n1", "harness-guest")
    assert pid in netns_pids(harness.node("n1").namespace)


def test_killing_a_node_kills_its_guests_and_restart_brings_libvirtd_back(
    harness_factory, guest_image
):
    harness = harness_factory(nodes=2, libvirt=True)
    uri = harness.node("n1").libvirtd.uri
    connection = libvirt.open(uri)
    connection.defineXML(domain_xml("crash-guest", guest_image)).create()
    connection.close()
    pid = qemu_pid(harness, "n1", "crash-guest")

    harness.kill("n1")
    assert process_start_ticks(pid) is None  # gone (or a zombie nobody reaps: PID 1 is no init)
    assert not harness.node("n1").libvirtd.answers()
    assert harness.node("n2").libvirtd.answers()

    harness.restart("n1")
    deadline = time.monotonic() + 30
    connection = libvirt.open(uri)
    try:
        domain = connection.lookupByName("crash-guest")  # the definition survives, as on disk
        while domain.isActive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not domain.isActive()
        domain.create()
        assert domain.isActive()
    finally:
        connection.close()


def test_libvirtd_runs_only_on_the_nodes_named(harness_factory):
    harness = harness_factory(nodes=2, libvirt={"n2"})
    n1, n2 = harness.node("n1"), harness.node("n2")
    assert "libvirtd" not in n1.processes and "RUCHER_LIBVIRT_URI" not in n1.service_env("x")
    assert n2.processes["libvirtd"].alive and n2.libvirtd.answers()
    assert Harness.load(harness.run_id).node("n2").libvirt
    assert not Harness.load(harness.run_id).node("n1").libvirt
