"""A dir storage through the real gateway, IAM and storage service: define, fill, read, empty."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from .stack import ADMIN, ADMIN_PASSWORD, NODE, Api, Stack, logged_in, unique
from .test_qemu_helpers import next_vmid
from .test_storage_helpers import start_storage, wait_storage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def storage_stack(stack: Stack) -> Stack:
    """The storage service beside the module's gateway and IAM."""
    start_storage(stack, stack.root / "local")

    async def wait() -> None:
        admin = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
        try:
            await wait_storage(admin)
        finally:
            await admin.close()

    asyncio.run(wait())
    return stack


async def _resources(admin: Api, storage: str, timeout: float = 30.0) -> dict:
    """The storage's ``/cluster/resources`` entry, once the node has published it."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await admin.get("/cluster/resources", type="storage")
        assert reply.status == 200, reply
        found = [entry for entry in reply.data if entry["storage"] == storage]
        if found:
            return dict(found[0])
        assert time.monotonic() < deadline, reply.data
        await asyncio.sleep(0.2)


async def test_a_dir_storage_is_defined_filled_read_and_emptied(storage_stack, admin, tmp_path):
    sid = unique("dir")
    folder = tmp_path / sid
    reply = await admin.post("/storage", storage=sid, type="dir", path=str(folder),
                             content="images,iso")  # fmt: skip
    assert reply.status == 200, reply
    assert reply.data == {"storage": sid, "type": "dir"}

    listed = {entry["storage"]: entry for entry in (await admin.get("/storage")).data}
    assert listed[sid]["path"] == str(folder)
    assert listed[sid]["content"] == "images,iso"
    config = (await admin.get(f"/storage/{sid}")).data
    assert len(config["digest"]) == 40

    reply = await admin.put(f"/storage/{sid}", nodes=NODE, digest=config["digest"])
    assert reply.status == 200, reply
    assert (await admin.get(f"/storage/{sid}")).data["nodes"] == NODE
    stale = await admin.put(f"/storage/{sid}", shared=1, digest=config["digest"])
    assert stale.status == 409, stale

    node = f"/nodes/{NODE}/storage"
    assert sid in [entry["storage"] for entry in (await admin.get(node)).data]
    status = (await admin.get(f"{node}/{sid}/status")).data
    assert status["active"] == 1 and status["total"] > 0, status
    assert status["type"] == "dir"

    vmid, other = next_vmid(), next_vmid()
    reply = await admin.post(f"{node}/{sid}/content", vmid=vmid,
                             filename=f"vm-{vmid}-disk-0.qcow2", size="4M")  # fmt: skip
    assert reply.status == 200, reply
    volid = reply.data
    assert volid == f"{sid}:{vmid}/vm-{vmid}-disk-0.qcow2"
    assert (folder / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2").is_file()
    reply = await admin.post(f"{node}/{sid}/content", vmid=other, filename=f"vm-{other}-disk-0",
                             size="1M", format="raw")  # fmt: skip
    assert reply.status == 200, reply

    content = (await admin.get(f"{node}/{sid}/content", vmid=vmid)).data
    assert [entry["volid"] for entry in content] == [volid]
    assert content[0]["size"] == 4 << 20
    assert content[0]["format"] == "qcow2"
    assert content[0]["content"] == "images"
    assert len((await admin.get(f"{node}/{sid}/content")).data) == 2

    # The volume id in the path, raw (':' and '/'), or its name under the path's storage.
    info = await admin.get(f"{node}/{sid}/content/{volid}")
    assert info.status == 200, info
    assert info.data["size"] == 4 << 20 and info.data["protected"] == 0
    assert info.data["path"] == str(folder / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2")
    bare = await admin.get(f"{node}/{sid}/content/{volid.partition(':')[2]}")
    assert bare.data == info.data
    reply = await admin.put(f"{node}/{sid}/content/{volid}", notes="boot disk", protected=1)
    assert reply.status == 200, reply
    info = await admin.get(f"{node}/{sid}/content/{volid}")
    assert info.data["notes"] == "boot disk" and info.data["protected"] == 1
    refused = await admin.delete(f"{node}/{sid}/content/{volid}")
    assert refused.status == 400 and "volume" in refused.errors, refused
    assert (await admin.put(f"{node}/{sid}/content/{volid}", protected=0)).status == 200

    resource = await _resources(admin, sid)
    assert resource["id"] == f"storage/{NODE}/{sid}"
    assert resource["plugintype"] == "dir" and resource["maxdisk"] > 0

    reply = await admin.delete(f"{node}/{sid}/content/{volid}")
    assert reply.status == 200, reply
    assert not (folder / "images" / str(vmid) / f"vm-{vmid}-disk-0.qcow2").exists()
    assert (await admin.get(f"{node}/{sid}/content/{volid}")).status == 404
    assert (await admin.get(f"{node}/{sid}/content", vmid=vmid)).data == []

    assert (await admin.delete(f"/storage/{sid}")).status == 200
    assert (await admin.get(f"/storage/{sid}")).status == 404


async def test_bad_requests_are_400_naming_the_field_and_create_nothing(
    storage_stack, admin, tmp_path: Path
):
    sid = unique("bad")
    cases = [
        ({"type": "nfs", "path": "/x"}, "type"),
        ({"type": "dir", "path": "relative/dir"}, "path"),
        ({"type": "dir", "path": str(tmp_path), "content": "images,nonsense"}, "content"),
        ({"type": "dir", "path": str(tmp_path), "server": "nas"}, "server"),
        ({"type": "dir"}, "path"),
    ]
    for params, field in cases:
        reply = await admin.post("/storage", storage=sid, **params)
        assert reply.status == 400, (params, reply)
        assert field in reply.errors, (params, reply)
    assert (await admin.get(f"/storage/{sid}")).status == 404
    assert sid not in [entry["storage"] for entry in (await admin.get("/storage")).data]

    node = f"/nodes/{NODE}/storage/local/content"
    vmid = next_vmid()
    for params, field in [
        ({"filename": f"vm-{vmid + 1}-disk-0", "size": "1M"}, "filename"),
        ({"filename": f"vm-{vmid}-disk-0", "size": "lots"}, "size"),
        ({"filename": f"vm-{vmid}-disk-0.qcow2", "size": "1M", "format": "raw"}, "format"),
    ]:
        reply = await admin.post(node, vmid=vmid, **params)
        assert reply.status == 400, (params, reply)
        assert field in reply.errors, (params, reply)
    assert (await admin.get(node, vmid=vmid)).data == []
    missing = await admin.get(f"{node}/local:{vmid}/vm-{vmid}-disk-9.qcow2")
    assert missing.status == 404, missing
    mismatch = await admin.get(f"{node}/other:{vmid}/vm-{vmid}-disk-0.qcow2")
    assert mismatch.status == 400 and "volume" in mismatch.errors, mismatch
