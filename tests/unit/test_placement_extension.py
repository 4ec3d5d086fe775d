"""``POST /cluster/qemu``: its schema derived from Proxmox's create, and what it asks to place."""

from __future__ import annotations

from rucher.gateway.__main__ import bundled_schema
from rucher.gateway.routes import placement
from rucher.proto.gpu import GpuKind
from rucher.proto.scheduler import GpuRequest

SCHEMA = bundled_schema()


def test_the_extension_takes_the_create_parameters_minus_node_plus_the_hints():
    extended = placement.extend(SCHEMA)
    base = SCHEMA.endpoint("POST", "/nodes/{node}/qemu")
    endpoint = extended.endpoint("POST", "/cluster/qemu")
    names = set(endpoint.parameters.properties)
    assert names == (set(base.parameters.properties) - {"node"}) | set(placement.HINTS)
    assert endpoint.permissions == base.permissions
    assert len(extended.endpoints) == len(SCHEMA.endpoints) + 1
    # Extending twice adds nothing; a schema without the Proxmox create is left alone.
    assert placement.extend(extended) is extended
    assert ("POST", "/cluster/qemu") not in SCHEMA.by_key


def test_memory_takes_proxmox_spellings_and_default():
    assert placement._memory(None) == 512 << 20
    assert placement._memory("2048") == 2048 << 20
    assert placement._memory("current=1024") == 1024 << 20


def test_the_storages_are_those_the_disks_name():
    config = {
        "scsi0": "local:8,format=qcow2",
        "virtio1": "file=ceph:vm-100-disk-1,cache=none",
        "ide2": "none,media=cdrom",
        "sata0": "/dev/sdb",
        "efidisk0": "local:1",
        "net0": "virtio,bridge=vmbr0",
    }
    assert placement._storages(config) == ("local", "ceph")


def test_named_mappings_become_gpu_requests():
    config = {
        "hostpci0": "mapping=gpu-a,pcie=1",
        "hostpci1": "0000:01:00.0",
        "hostpci2": "mapping=vgpu,mdev=nvidia-35",
    }
    assert placement._gpus(config) == (
        GpuRequest(kind=GpuKind.PASSTHROUGH, mapping="gpu-a"),
        GpuRequest(kind=GpuKind.MDEV, mapping="vgpu", mdev_type="nvidia-35"),
    )


def test_lists_split_on_proxmox_separators():
    assert placement._names("aes;avx2, sse4_2") == ("aes", "avx2", "sse4_2")
    assert placement._names(None) == ()
