"""PCI devices and PCI mappings through the real gateway, IAM and GPU broker (on a fake sysfs)."""

from __future__ import annotations

import asyncio

import pytest

from rucher.bus import RucherError
from rucher.proto import gpu
from rucher.proto.errors import ErrorCode
from rucher.proto.gpu import PciMapping, PciMappingEntry

from ...unit.gpu_hosts import L40S, NVIDIA
from ..buses import connected
from .stack import (
    ADMIN,
    ADMIN_PASSWORD,
    NODE,
    Api,
    Stack,
    logged_in,
    make_user,
    unique,
)
from .test_gateway_gpu_helpers import start_gpu, wait_gpu

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gpu_stack(stack: Stack) -> Stack:
    """The GPU broker beside the module's gateway and IAM, on a synthetic host's sysfs tree."""
    start_gpu(stack)

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_gpu(admin)
        finally:
            await admin.close()

    asyncio.run(wait())
    return stack


def _mapping(mapping_id: str, path: str, device: str = L40S) -> PciMapping:
    entry = PciMappingEntry(node=NODE, path=path, vendor_id=NVIDIA, device_id=device)
    return PciMapping(id=mapping_id, map=(entry,), mdev=True, description="vGPU host")


async def _create(stack: Stack, mapping: PciMapping) -> None:
    async with connected(stack.nats_url) as bus:
        command = gpu.MappingCreate(command_id=unique("c"), mapping=mapping)
        await bus.request(gpu.MAPPING_CREATE.address, command, timeout=15)


async def test_the_node_lists_its_pci_devices_like_proxmox(gpu_stack, admin):
    reply = await admin.get(f"/nodes/{NODE}/hardware/pci")
    assert reply.status == 200, reply
    by_id = {entry["id"]: entry for entry in reply.data}
    gpu0 = by_id["0000:41:00.0"]
    assert gpu0["class"] == "0x030000" and gpu0["vendor"] == "0x10de" and gpu0["device"] == "0x26b9"
    assert gpu0["iommugroup"] == 20 and "mdev" not in gpu0
    assert by_id["0000:43:00.0"]["mdev"] == 1
    assert "0000:40:01.0" not in by_id  # a bridge: class 06 is blacklisted by default
    every = await admin.get(f"/nodes/{NODE}/hardware/pci", **{"pci-class-blacklist": ""})
    assert "0000:40:01.0" in {entry["id"] for entry in every.data}

    types = await admin.get(f"/nodes/{NODE}/hardware/pci/0000:43:00.0/mdev")
    assert types.status == 200, types
    assert [(t["type"], t["available"]) for t in types.data] == [
        ("nvidia-1155", 4),
        ("nvidia-1156", 2),
    ]
    short = await admin.get(f"/nodes/{NODE}/hardware/pci/43:00.0/mdev")
    assert short.data == types.data
    missing = await admin.get(f"/nodes/{NODE}/hardware/pci/0000:99:00.0/mdev")
    assert missing.status == 404, missing


async def test_a_mapping_is_created_listed_changed_used_and_deleted(gpu_stack, admin):
    name = unique("vgpu")
    reply = await admin.post(
        "/cluster/mapping/pci",
        id=name,
        map=f"node={NODE},path=0000:43:00,id=10DE:26B9,iommugroup=22",
        mdev=1,
        description="vGPU host",
    )
    assert reply.status == 200, reply
    listed = {entry["id"]: entry for entry in (await admin.get("/cluster/mapping/pci")).data}
    assert listed[name]["map"] == [f"node={NODE},path=0000:43:00.0,id=10de:26b9,iommugroup=22"]
    assert listed[name]["mdev"] == 1 and listed[name]["description"] == "vGPU host"
    one = await admin.get(f"/cluster/mapping/pci/{name}")
    assert one.status == 200 and one.data["digest"] == listed[name]["digest"]
    checked = await admin.get("/cluster/mapping/pci", **{"check-node": NODE})
    assert {e["id"]: e["checks"] for e in checked.data}[name] == []
    types = await admin.get(f"/nodes/{NODE}/hardware/pci/{name}/mdev")
    assert types.status == 200 and types.data[0]["type"] == "nvidia-1155"

    # Two entries in one JSON array; a stale digest loses.
    reply = await admin.client.put(
        f"/cluster/mapping/pci/{name}",
        json={"map": [f"node={NODE},path=0000:41:00.0,id=10de:26b9"], "delete": "mdev",
              "digest": one.data["digest"]},
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    changed = (await admin.get(f"/cluster/mapping/pci/{name}")).data
    assert changed["map"] == [f"node={NODE},path=0000:41:00.0,id=10de:26b9"]
    assert "mdev" not in changed
    stale = await admin.put(
        f"/cluster/mapping/pci/{name}", description="x", digest=one.data["digest"]
    )
    assert stale.status == 409, stale

    assert (await admin.delete(f"/cluster/mapping/pci/{name}")).status == 200
    assert (await admin.get(f"/cluster/mapping/pci/{name}")).status == 404


async def test_a_mapping_naming_a_missing_device_is_refused_and_not_stored(gpu_stack, admin):
    name = unique("bad")
    for entry in (
        f"node={NODE},path=0000:99:00.0,id=10de:26b9",  # no such device on the node
        f"node={NODE},path=0000:43:00.0,id=10de:1111",  # not the device there
        f"node={NODE},path=0000:43:00.0",  # no id
        f"node={NODE},path=0000:43:00.0;0000:41:00.0,id=10de:26b9",  # several paths
    ):
        reply = await admin.post("/cluster/mapping/pci", id=name, map=entry)
        assert reply.status == 400, (entry, reply)
        assert "map" in reply.errors, (entry, reply)
    assert (await admin.get(f"/cluster/mapping/pci/{name}")).status == 404
    # The broker refuses it on the bus too, whoever asks.
    with pytest.raises(RucherError) as refused:
        await _create(gpu_stack, _mapping(name, "0000:99:00.0"))
    assert refused.value.code is ErrorCode.INVALID


async def test_mappings_follow_the_mapping_privileges(gpu_stack, admin, stack):
    name = unique("priv")
    await _create(gpu_stack, _mapping(name, "0000:41:00.0"))
    nobody = await make_user(admin)
    auditor = await make_user(admin, grants=[(f"/mapping/pci/{name}", ["Mapping.Audit"])])
    for userid, sees in ((nobody, False), (auditor, True)):
        api = await logged_in(stack, userid, "user-pass-1")
        try:
            listed = [entry["id"] for entry in (await api.get("/cluster/mapping/pci")).data]
            assert (name in listed) is sees
            assert (await api.get(f"/cluster/mapping/pci/{name}")).status == (200 if sees else 403)
            assert (await api.delete(f"/cluster/mapping/pci/{name}")).status == 403
            refused = await api.post("/cluster/mapping/pci", id=unique("x"),
                                     map=f"node={NODE},path=0000:41:00.0,id=10de:26b9")  # fmt: skip
            assert refused.status == 403
            assert (await api.get(f"/nodes/{NODE}/hardware/pci")).status == 403
        finally:
            await api.close()
    anonymous = Api(stack)
    try:
        assert (await anonymous.get("/cluster/mapping/pci")).status == 401
    finally:
        await anonymous.close()
