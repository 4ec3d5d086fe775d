"""``POST .../upload`` through the real gateway, IAM and storage service, and through proxmoxer.

The file streams from the HTTP body into the ``uploads`` object store and from there into the
storage: a good upload lands whole and verified, a wrong checksum and a body cut off halfway
leave no file (visible or partial) and no object behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import time
from pathlib import Path

import nats.js.errors
import pytest
from proxmoxer import ProxmoxAPI

from rucher.proto.streams import UPLOADS

from ..buses import connected
from .stack import ADMIN, ADMIN_PASSWORD, NODE, Api, Stack, logged_in, unique
from .test_qemu_helpers import finished
from .test_storage_helpers import start_storage, wait_storage

pytestmark = pytest.mark.integration

ISO_DIR = ("template", "iso")


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


def iso_dir(stack: Stack) -> Path:
    return stack.root.joinpath("local", *ISO_DIR)


def leftovers(stack: Stack, name: str) -> list[str]:
    """Files in the ISO folder that mention ``name`` (the file itself or a hidden partial)."""
    folder = iso_dir(stack)
    return sorted(p.name for p in folder.iterdir() if name in p.name) if folder.is_dir() else []


async def stored_objects(stack: Stack) -> tuple[int, list[str]]:
    """Chunk messages left in the ``uploads`` store, and the live objects it lists."""
    async with connected(stack.nats_url, node=NODE, service="upload-test") as bus:
        info = await bus.js.stream_info(
            f"OBJ_{UPLOADS.name}", subjects_filter=f"$O.{UPLOADS.name}.C.>"
        )
        chunks = sum((info.state.subjects or {}).values())
        store = await bus.js.object_store(UPLOADS.name)
        try:
            names = [entry.name for entry in await store.list(ignore_deletes=True)]
        except nats.js.errors.NotFoundError:  # an empty store
            names = []
        return chunks, names


async def until_empty(stack: Stack, timeout: float = 15.0) -> None:
    """Wait until the ``uploads`` store holds no object and no chunk (each is deleted once used)."""
    deadline = time.monotonic() + timeout
    while (found := await stored_objects(stack)) != (0, []):
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.1)


def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "rucher" + os.urandom(8).hex()
    body = b""
    for key, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode()
        body += value.encode() + b"\r\n"
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="filename"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def upload(api: Api, filename: str, data: bytes, **fields: str):
    body, content_type = multipart({"content": "iso", **fields}, filename, data)
    response = await api.client.post(
        f"/nodes/{NODE}/storage/local/upload",
        content=body,
        headers={"Content-Type": content_type},
    )
    return response.status_code, response.json()


async def test_an_upload_lands_whole_and_verified(storage_stack, admin):
    data = os.urandom(3 << 20) + b"tail"
    name = f"{unique('up')}.iso"
    status, body = await upload(
        admin, name, data, checksum=hashlib.sha512(data).hexdigest(),
        **{"checksum-algorithm": "sha512"},
    )  # fmt: skip
    assert status == 200, body
    upid = body["data"]
    assert upid.startswith(f"UPID:{NODE}:") and ":imgcopy:" in upid
    task = await finished(admin, upid)
    assert task["exitstatus"] == "OK", task
    log = (await admin.get(f"/nodes/{NODE}/tasks/{upid}/log", limit=50)).data
    assert any("sha512 checksum verified" in line["t"] for line in log), log
    assert (iso_dir(storage_stack) / name).read_bytes() == data
    assert leftovers(storage_stack, name) == [name]
    content = (await admin.get(f"/nodes/{NODE}/storage/local/content", content="iso")).data
    assert {"volid": f"local:iso/{name}", "size": len(data)}.items() <= next(
        entry for entry in content if entry["volid"] == f"local:iso/{name}"
    ).items()
    await until_empty(storage_stack)

    # The same name again: refused before any task, and the object it streamed is gone.
    status, body = await upload(admin, name, b"other")
    assert status == 409 and "refusing to override" in body["message"], body
    await until_empty(storage_stack)


async def test_a_wrong_checksum_leaves_nothing(storage_stack, admin):
    data = os.urandom(300_000)
    name = f"{unique('bad')}.iso"
    status, body = await upload(
        admin, name, data, checksum=hashlib.sha256(b"not it").hexdigest(),
        **{"checksum-algorithm": "sha256"},
    )  # fmt: skip
    assert status == 200, body
    task = await finished(admin, body["data"])
    assert "checksum mismatch" in task["exitstatus"], task
    assert leftovers(storage_stack, name) == []
    content = (await admin.get(f"/nodes/{NODE}/storage/local/content", content="iso")).data
    assert f"local:iso/{name}" not in {entry["volid"] for entry in content}
    await until_empty(storage_stack)


async def test_a_body_cut_off_halfway_leaves_nothing(storage_stack, admin):
    name = f"{unique('cut')}.iso"
    body, content_type = multipart({"content": "iso"}, name, os.urandom(4 << 20))
    ticket = admin.client.cookies["PVEAuthCookie"]
    csrf = admin.client.headers["CSRFPreventionToken"]
    head = (
        f"POST /api2/json/nodes/{NODE}/storage/local/upload HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCookie: PVEAuthCookie={ticket}\r\n"
        f"CSRFPreventionToken: {csrf}\r\n\r\n"
    ).encode()

    def send_half() -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", storage_stack.port)) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)  # let the gateway store what it got before the client goes

    await asyncio.to_thread(send_half)
    await until_empty(storage_stack)
    assert leftovers(storage_stack, name) == []
    content = (await admin.get(f"/nodes/{NODE}/storage/local/content", content="iso")).data
    assert f"local:iso/{name}" not in {entry["volid"] for entry in content}


async def test_bad_uploads_are_refused_naming_the_field(storage_stack, admin):
    reply = await admin.post(f"/nodes/{NODE}/storage/local/upload", content="iso",
                             filename="x.iso")  # fmt: skip
    assert reply.status == 400 and "filename" in reply.errors, reply
    status, body = await upload(admin, "x.iso", b"data", content="import")
    assert status == 400 and "content" in body["errors"], body
    status, body = await upload(admin, "not-an-iso.txt", b"data")
    assert status == 400 and "filename" in body["errors"], body
    status, body = await upload(admin, "x.iso", b"data", checksum="abc")
    assert status == 400 and "checksum-algorithm" in body["errors"], body
    status, body = await upload(
        admin, "x.iso", b"data", checksum="abc", **{"checksum-algorithm": "sha256"}
    )
    assert status == 400 and "checksum" in body["errors"], body
    # A form where the file is not last: the trailing field is named, nothing is stored.
    good, content_type = multipart({"content": "iso"}, "late.iso", b"data")
    boundary = content_type.split("=", 1)[1]
    late = (
        good[: -len(f"--{boundary}--\r\n")]
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="checksum"\r\n\r\nab\r\n'
            f"--{boundary}--\r\n"
        ).encode()
    )
    response = await admin.client.post(
        f"/nodes/{NODE}/storage/local/upload", content=late,
        headers={"Content-Type": content_type},
    )  # fmt: skip
    assert response.status_code == 400 and "checksum" in response.json()["errors"]
    # Other endpoints take no multipart body.
    response = await admin.client.post(
        f"/nodes/{NODE}/storage/local/download-url", content=good,
        headers={"Content-Type": content_type},
    )  # fmt: skip
    assert response.status_code == 415, response.text
    await until_empty(storage_stack)
    assert leftovers(storage_stack, "late.iso") == []


def test_proxmoxer_uploads_an_iso_and_a_template(storage_stack, tmp_path):
    api = ProxmoxAPI("127.0.0.1", port=storage_stack.port, backend="https", verify_ssl=False,
                     user=ADMIN, password=ADMIN_PASSWORD)  # fmt: skip
    storage = api.nodes(NODE).storage("local")
    iso = tmp_path / f"{unique('px')}.iso"
    iso.write_bytes(os.urandom(1 << 20))
    template = tmp_path / f"{unique('ct')}.tar.gz"
    template.write_bytes(os.urandom(70_000))
    for path, content in ((iso, "iso"), (template, "vztmpl")):
        with path.open("rb") as file:
            upid = storage.upload.post(
                content=content, filename=file, checksum=hashlib.md5(path.read_bytes()).hexdigest(),
                **{"checksum-algorithm": "md5"},
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while (status := api.nodes(NODE).tasks(upid).status.get())["status"] != "stopped":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status["exitstatus"] == "OK", status
    volids = {entry["volid"] for entry in storage.content.get()}
    assert {f"local:iso/{iso.name}", f"local:vztmpl/{template.name}"} <= volids
    folder = storage_stack.root / "local" / "template"
    assert (folder / "iso" / iso.name).read_bytes() == iso.read_bytes()
    assert (folder / "cache" / template.name).read_bytes() == template.read_bytes()


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.mark.slow
async def test_a_large_upload_streams_through_the_gateway_in_bounded_memory(storage_stack, admin):
    size, piece = 96 << 20, 1 << 20
    gateway = next(p for p in storage_stack.processes if p.name == "gateway")
    before = peak_rss(gateway.pid)
    name = f"{unique('big')}.iso"
    boundary = "rucher" + os.urandom(8).hex()
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="content"\r\n\r\niso\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="filename"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    digest = hashlib.sha256()

    async def body():
        yield head
        for index in range(size // piece):
            chunk = index.to_bytes(4, "big") * (piece // 4)
            digest.update(chunk)
            yield chunk
        yield tail

    response = await admin.client.post(
        f"/nodes/{NODE}/storage/local/upload",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                 "Content-Length": str(len(head) + size + len(tail))},
        timeout=300,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    task = await finished(admin, response.json()["data"], timeout=300)
    assert task["exitstatus"] == "OK", task
    stored = iso_dir(storage_stack) / name
    assert stored.stat().st_size == size

    def sha256_of(path: Path) -> str:
        check = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                check.update(chunk)
        return check.hexdigest()

    assert await asyncio.to_thread(sha256_of, stored) == digest.hexdigest()
    # 96 MiB went through; the gateway's peak memory grew by a small fraction of that.
    assert peak_rss(gateway.pid) - before < 24 << 20, (before, peak_rss(gateway.pid))
    await until_empty(storage_stack)
