"""Real guests through the gateway: serial console (termproxy + vncwebsocket), rrddata, a
cloud-init seed, and an aarch64 guest under emulation.

The gateway, IAM and the compute agent run as processes on a real nats-server; the guest boots
the test kernel under QEMU (TCG here) with ``serial0: socket``; the test types a command into
its shell over the websocket and reads the answer back.
"""
# ruff: noqa: F811 - pytest fixtures imported from rucher.testing.libvirt are parameters here

from __future__ import annotations

import asyncio
import itertools
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from rucher.testing.libvirt import GuestImage, guest_image, libvirtd  # noqa: F401 - fixtures

from .stack import ADMIN, ADMIN_PASSWORD, NODE, Api, Stack, logged_in, make_user, unique
from .test_qemu_helpers import finished, make_vm, start_agent

pytest.importorskip("libvirt")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHELL_PATIENCE = 120.0


@pytest.fixture(scope="module")
def agent(stack: Stack, libvirtd: str) -> Stack:
    """The compute agent on the system libvirtd, sampling guests every second."""
    start_agent(stack, libvirtd, RUCHER_COMPUTE_RRD_INTERVAL="1")
    log = stack.root / "compute.log"
    deadline = time.monotonic() + 60
    # Every subject is served once the service says it started (a 404 of the gateway's own
    # registry check would not tell).
    while '"service_started"' not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    return stack


@pytest.fixture
async def running(agent: Stack, guest_image: GuestImage) -> AsyncIterator[tuple[Api, int]]:
    """A running test guest with ``serial0: socket``, stopped and destroyed afterwards."""
    admin = await logged_in(agent, ADMIN, ADMIN_PASSWORD)
    vmid = await make_vm(
        admin,
        start=True,
        memory=192,
        serial0="socket",
        vga="serial0",
        args=f"-kernel {guest_image.kernel} -initrd {guest_image.initrd} "
        f"-append '{guest_image.cmdline}'",
    )
    try:
        yield admin, vmid
    finally:
        reply = await admin.post(f"/nodes/{NODE}/qemu/{vmid}/status/stop")
        if reply.status == 200:
            await finished(admin, reply.data)
        reply = await admin.delete(f"/nodes/{NODE}/qemu/{vmid}", purge=1)
        if reply.status == 200:
            await finished(admin, reply.data)
        await admin.close()


def _url(stack: Stack, vmid: int, port: int, ticket: str) -> str:
    query = urlencode({"port": port, "vncticket": ticket})
    return f"wss://127.0.0.1:{stack.port}/api2/json/nodes/{NODE}/qemu/{vmid}/vncwebsocket?{query}"


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _cookie(api: Api) -> dict[str, str]:
    return {"Cookie": f"PVEAuthCookie={quote(api.client.cookies['PVEAuthCookie'], safe='')}"}


async def _open(api: Api, vmid: int) -> dict[str, Any]:
    reply = await api.post(f"/nodes/{NODE}/qemu/{vmid}/termproxy", serial="serial0")
    assert reply.status == 200, reply
    return dict(reply.data)


def _data(text: str) -> str:
    return f"0:{len(text.encode())}:{text}"


async def _until(socket: ClientConnection, wanted: str, keystrokes: str) -> str:
    """Type ``keystrokes`` every few seconds until ``wanted`` shows in the output."""
    seen = ""
    deadline = time.monotonic() + SHELL_PATIENCE
    next_typing = 0.0
    while wanted not in seen:
        assert time.monotonic() < deadline, f"no {wanted!r} in the console output: {seen[-2000:]!r}"
        if time.monotonic() >= next_typing:
            await socket.send(_data(keystrokes))
            await socket.send("2")  # a ping in between: ignored by the console
            next_typing = time.monotonic() + 3.0
        try:
            message = await asyncio.wait_for(socket.recv(), 1.0)
        except TimeoutError:
            continue
        seen += message.decode(errors="replace") if isinstance(message, bytes) else message
    return seen


async def test_the_serial_console_answers_over_the_websocket(agent, running):
    admin, vmid = running
    opened = await _open(admin, vmid)
    assert 5900 <= opened["port"] <= 5999
    assert opened["user"] == ADMIN
    assert opened["upid"].startswith(f"UPID:{NODE}:")
    assert ":vncproxy:" in opened["upid"]
    url = _url(agent, vmid, opened["port"], opened["ticket"])
    async with connect(
        url, ssl=_tls(), additional_headers=_cookie(admin), subprotocols=["binary"]
    ) as socket:
        await socket.send(f"{ADMIN}:{opened['ticket']}\n")
        assert await asyncio.wait_for(socket.recv(), 10) == "OK"
        await socket.send("1:80:24:")  # a resize: a serial port has no size, nothing breaks
        await _until(socket, "/ # ", "\n")  # Enter until the shell's prompt shows
        output = await _until(socket, "\nrucher-42", "echo rucher-$((6*7))\n")
        assert "echo rucher-$((6*7))" in output  # the shell echoed the typed line
    status = await finished(admin, opened["upid"], timeout=60)
    assert status["exitstatus"] == "OK", status
    # The ticket was good for one connection only.
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with connect(url, ssl=_tls(), additional_headers=_cookie(admin)):
            pass


async def test_a_websocket_without_credentials_or_with_a_wrong_ticket_is_refused(agent, running):
    admin, vmid = running
    opened = await _open(admin, vmid)
    good = _url(agent, vmid, opened["port"], opened["ticket"])
    wrong = _url(agent, vmid, opened["port"], "PVEVNC:not-the-ticket")
    with pytest.raises(websockets.exceptions.InvalidStatus) as unauthenticated:
        async with connect(good, ssl=_tls()):
            pass
    assert unauthenticated.value.response.status_code == 403
    with pytest.raises(websockets.exceptions.InvalidStatus) as mistaken:
        async with connect(wrong, ssl=_tls(), additional_headers=_cookie(admin)):
            pass
    assert mistaken.value.response.status_code == 403
    # The refusals did not spend the session: its owner still gets in, but must present the
    # same ticket again in the first message.
    async with connect(good, ssl=_tls(), additional_headers=_cookie(admin)) as socket:
        await socket.send(f"{ADMIN}:PVEVNC:another-ticket\n")
        answers = [message async for message in socket]
    assert "OK" not in answers
    status = await finished(admin, opened["upid"], timeout=60)
    assert "no client connected" in status["exitstatus"], status


async def test_a_stopped_guest_or_one_without_a_socket_serial_has_no_console(agent, running):
    admin, vmid = running
    reply = await admin.post(f"/nodes/{NODE}/qemu/{vmid}/termproxy", serial="serial1")
    assert reply.status == 400, reply
    assert "serial1" in reply.errors
    quiet = await make_vm(admin, serial0="socket")
    try:
        reply = await admin.post(f"/nodes/{NODE}/qemu/{quiet}/termproxy")
        assert reply.status == 400, reply
        assert "not running" in str(reply.body)
    finally:
        reply = await admin.delete(f"/nodes/{NODE}/qemu/{quiet}", purge=1)
        await finished(admin, reply.data)


async def test_rrddata_has_the_running_guests_samples(agent, running):
    admin, vmid = running
    deadline = time.monotonic() + 30
    while True:
        reply = await admin.get(f"/nodes/{NODE}/qemu/{vmid}/rrddata", timeframe="hour")
        assert reply.status == 200, reply
        points = reply.data
        assert len(points) == 70
        steps = {later["time"] - earlier["time"] for earlier, later in itertools.pairwise(points)}
        assert steps == {60}
        if "cpu" in points[-1]:
            break
        assert time.monotonic() < deadline, points[-3:]
        await asyncio.sleep(0.5)
    last = points[-1]
    assert last["maxmem"] == 192 << 20
    assert last["maxcpu"] == 1
    assert 0 <= last["cpu"] <= 1
    assert 0 < last["mem"] <= 192 << 20
    for name in ("diskread", "diskwrite", "netin", "netout"):
        assert last[name] >= 0
    peak = await admin.get(f"/nodes/{NODE}/qemu/{vmid}/rrddata", timeframe="day", cf="MAX")
    assert peak.status == 200
    assert peak.data[-1]["time"] % 1800 == 0
    assert peak.data[-1]["maxmem"] == 192 << 20
    bad = await admin.get(f"/nodes/{NODE}/qemu/{vmid}/rrddata", timeframe="decade")
    assert bad.status == 400
    assert "timeframe" in bad.errors


def _iso_volume(image: Path) -> str:
    result = subprocess.run(
        ["isoinfo", "-d", "-i", str(image)], capture_output=True, text=True, check=True
    )
    return result.stdout


def _iso_file(image: Path, name: str) -> str:
    result = subprocess.run(
        ["isoinfo", "-R", "-i", str(image), "-x", f"/{name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


async def test_a_cloudinit_drive_gets_a_readable_seed_that_follows_the_config(agent):
    admin = await logged_in(agent, ADMIN, ADMIN_PASSWORD)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl ci@test"
    vmid = await make_vm(
        admin,
        name="seeded",
        ide2="local:cloudinit",
        ciuser="debian",
        cipassword="correct horse",
        sshkeys=quote(key, safe=""),
        ipconfig0="ip=192.0.2.10/24,gw=192.0.2.1",
        nameserver="192.0.2.53",
        searchdomain="example.com",
        net0="virtio,bridge=vmbr0",
    )
    image = agent.root / "compute" / "cloudinit" / f"{vmid}-cidata.iso"
    try:
        assert "Volume id: cidata" in _iso_volume(image)
        user = _iso_file(image, "user-data")
        assert user.startswith("#cloud-config\n")
        assert 'user: "debian"' in user
        assert f'  - "{key}"' in user
        assert "hostname: seeded" in user
        network = _iso_file(image, "network-config")
        assert "address: '192.0.2.10'" in network
        assert "gateway: '192.0.2.1'" in network
        assert "- 'example.com'" in network
        assert "instance-id: " in _iso_file(image, "meta-data")
        config = (await admin.get(f"/nodes/{NODE}/qemu/{vmid}/config")).data
        assert config["ide2"] == "local:cloudinit"
        assert config["cipassword"] == "**********"
        assert 'password: "$6$' in user  # hashed, as Proxmox hands it to cloud-init
        assert "correct horse" not in user
        # libvirt has the seed attached as the drive's CD-ROM.
        libvirt = pytest.importorskip("libvirt")
        connection = libvirt.open("qemu:///system")
        try:
            xml = connection.lookupByName(f"rucher-{vmid}").XMLDesc(0)
        finally:
            connection.close()
        assert f"<source file='{image}'/>" in xml
        assert "device='cdrom'" in xml
        # A changed ci option rebuilds the seed.
        reply = await admin.put(f"/nodes/{NODE}/qemu/{vmid}/config", ciuser="admin")
        assert reply.status == 200, reply
        assert 'user: "admin"' in _iso_file(image, "user-data")
        bad = await admin.put(f"/nodes/{NODE}/qemu/{vmid}/config", ipconfig0="ip=192.0.2.10")
        assert bad.status == 400, bad
        assert "ipconfig0" in bad.errors
        assert 'user: "admin"' in _iso_file(image, "user-data")
    finally:
        reply = await admin.delete(f"/nodes/{NODE}/qemu/{vmid}", purge=1)
        assert reply.status == 200, reply
        assert (await finished(admin, reply.data))["exitstatus"] == "OK"
        await admin.close()
    assert not image.exists()


@pytest.fixture(scope="module")
def arm64_kernel() -> Path:
    """Debian's arm64 kernel, fetched once by ops/build-arm64-kernel."""
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [str(root / "ops" / "build-arm64-kernel"), "--print-path"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"ops/build-arm64-kernel failed: {result.stderr[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


async def test_an_aarch64_guest_boots_its_kernel_under_emulation(agent, arm64_kernel):
    if not shutil.which("qemu-system-aarch64"):
        pytest.fail("qemu-system-aarch64 is missing: run ops/libvirt install")
    admin = await logged_in(agent, ADMIN, ADMIN_PASSWORD)
    vmid = await make_vm(
        admin,
        start=True,
        arch="aarch64",
        memory=256,
        serial0="socket",
        vga="serial0",
        args=f"-kernel {arm64_kernel} -append 'console=ttyAMA0 earlycon'",
    )
    console = agent.root / "compute" / "console" / f"{vmid}-serial0.log"
    try:
        current = (await admin.get(f"/nodes/{NODE}/qemu/{vmid}/status/current")).data
        assert current["status"] == "running"
        deadline = time.monotonic() + 120
        text = ""
        while "Booting Linux on physical CPU" not in text:
            assert time.monotonic() < deadline, f"no arm64 boot banner: {text[-2000:]!r}"
            await asyncio.sleep(0.5)
            text = console.read_text(errors="replace") if console.exists() else ""
        assert "Linux version" in text
        assert "aarch64" in text or "arm64" in text
    finally:
        reply = await admin.post(f"/nodes/{NODE}/qemu/{vmid}/status/stop")
        if reply.status == 200:
            await finished(admin, reply.data)
        reply = await admin.delete(f"/nodes/{NODE}/qemu/{vmid}", purge=1)
        if reply.status == 200:
            await finished(admin, reply.data)
        await admin.close()


async def test_an_api_token_opens_the_console_too(agent, running):
    admin, vmid = running
    reply = await admin.post(f"/access/users/{ADMIN}/token/{unique('ws')}", privsep=0)
    assert reply.status == 200, reply
    token = reply.data
    header = {"Authorization": f"PVEAPIToken={token['full-tokenid']}={token['value']}"}
    tokened = Api(agent, headers=header)
    try:
        opened = await _open(tokened, vmid)
        assert opened["user"] == token["full-tokenid"]
        url = _url(agent, vmid, opened["port"], opened["ticket"])
        async with connect(url, ssl=_tls(), additional_headers=header) as socket:
            await socket.send(f"{token['full-tokenid']}:{opened['ticket']}\n")
            assert await asyncio.wait_for(socket.recv(), 10) == "OK"
            await _until(socket, "/ # ", "\n")
        # Another user, even one who may open consoles, cannot take a token's session.
        opened = await _open(tokened, vmid)
        url = _url(agent, vmid, opened["port"], opened["ticket"])
        other = await make_user(
            admin, grants=[(f"/vms/{vmid}", ["VM.Console"])], password="other-pass-1"
        )
        stranger = await logged_in(agent, other, "other-pass-1")
        try:
            with pytest.raises(websockets.exceptions.InvalidStatus):
                async with connect(url, ssl=_tls(), additional_headers=_cookie(stranger)):
                    pass
        finally:
            await stranger.close()
    finally:
        await tokened.close()
