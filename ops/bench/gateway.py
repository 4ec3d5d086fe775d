"""Gateway benchmark: authenticated GET /cluster/resources vs a bare FastAPI endpoint; ACL p99.

Run: .venv/bin/python ops/bench/gateway.py [--seconds S] [--connections C] [--rounds R]

Starts its own nats-server, IAM service and gateway (temporary state, free ports, 127.0.0.1
only), writes a cluster of 3 nodes and 100 guests into the store as the agents would, and makes
an API token. Then, on the same uvicorn settings (TLS, httptools, uvloop, one process):

- gateway: ``GET /api2/json/cluster/resources`` with ``Authorization: PVEAPIToken=...`` (token
  check, parameter check, permission filtering, read model, access log line);
- bare: a FastAPI endpoint returning the same bytes from memory, without authentication.

Load comes from ``wrk`` (Debian's package) with keep-alive connections; without wrk, from a
small asyncio HTTP/1.1 client in a separate process. Rounds alternate bare and gateway; the best
of each counts. Then the permission check (``AuthzView.allowed``, i.e. the IAM index) is timed
over 10,000 ACL entries: every query a fresh (user, path) pair first, then the same pairs again.

Last line: RESULT gateway_ratio=<gateway/bare requests per s> acl_p99_ms=<p99, fresh pairs>
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgspec

from rucher.authz import IamState
from rucher.bus import Bus
from rucher.bus.provision import provision
from rucher.guests import GuestRegistry
from rucher.leases import Lease
from rucher.proto.cluster import NODE_CAPACITY_PUBLISHED, CapacityPublished, CpuArch, NodeCapacity
from rucher.proto.guest import GuestType
from rucher.proto.iam_state import AclRecord, AclSubjectType, GroupRecord, UserRecord
from rucher.proto.storage import (
    STATUS_PUBLISHED,
    ContentType,
    StorageStatus,
    StorageStatusPublished,
    StorageType,
)
from rucher.registry import ServiceRegistry, describe_self
from rucher.testing.nats import NatsServer, free_port
from rucher.testing.process import ManagedProcess

NODES = ("n1", "n2", "n3")
GUESTS = 100
ADMIN_PASSWORD = "bench-admin-pass"
RESOURCES = "/api2/json/cluster/resources"
ACL_ENTRIES = 10_000
RATIO_TARGET = 0.5
P99_TARGET_MS = 0.2


# The cluster ------------------------------------------------------------------------------


def service(name: str, root: Path, nats_url: str, **env: str) -> ManagedProcess:
    """One Rucher service process of the benchmark's stack."""
    base = {
        "RUCHER_NATS_URL": nats_url,
        "RUCHER_NODE": "n1",
        "RUCHER_STATE_DIR": str(root / name),
        "RUCHER_LOG_FORMAT": "json",
        "RUCHER_LOG_LEVEL": "info",
    }
    return ManagedProcess(
        name, [sys.executable, "-m", f"rucher.{name}"], root / f"{name}.log", {**base, **env}
    )


async def seed(bus: Bus) -> list[Lease]:
    """Three nodes (registrations, capacity, one storage each) and 100 guests."""
    leases = []
    registry = ServiceRegistry(bus)
    for node in NODES:
        instance = msgspec.structs.replace(describe_self(bus), node=node)
        leases.append(await registry.register(instance, ttl=30))
        capacity = NodeCapacity(
            node=node,
            arch=CpuArch.X86_64,
            cpu_model="bench",
            cpus=32,
            sockets=2,
            memory_total=256 << 30,
            memory_used=64 << 30,
            time=time.time(),
            uptime=3600.0,
            cpu_usage=0.25,
        )
        await bus.publish(
            NODE_CAPACITY_PUBLISHED.to(node=node),
            CapacityPublished(
                event_id=f"cap-{node}", node=node, time=time.time(), capacity=capacity
            ),
        )
        storage = StorageStatus(
            storage="local",
            storage_type=StorageType.DIR,
            content=(ContentType.IMAGES, ContentType.ISO),
            shared=False,
            active=True,
            enabled=True,
            total=1 << 40,
            used=1 << 38,
            avail=(1 << 40) - (1 << 38),
        )
        await bus.publish(
            STATUS_PUBLISHED.to(node=node),
            StorageStatusPublished(
                event_id=f"st-{node}", node=node, time=time.time(), storages=(storage,)
            ),
        )
    guests = GuestRegistry(bus)
    for index in range(GUESTS):
        kind = GuestType.QEMU if index % 4 else GuestType.LXC
        config = {
            "name" if kind is GuestType.QEMU else "hostname": f"guest-{index}",
            "memory": "2048",
            "cores": "2",
            "tags": "bench",
        }
        await guests.register(guest_type=kind, node=NODES[index % 3], config=config, lock=None)
    return leases


def wait_for(url: str, process: list[ManagedProcess], timeout: float = 60.0) -> None:
    """Until ``url`` answers 200 (the stack is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in process:
            if not proc.alive:
                raise SystemExit(f"{proc.name} exited:\n{proc.tail_log(30)}")
        try:
            if httpx.get(url, verify=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def make_token(base: str) -> tuple[str, bytes]:
    """An auditor user with an API token; returns its header and the resources it reads."""
    with httpx.Client(base_url=base, verify=False, timeout=30) as admin:
        login = admin.post(
            "/access/ticket", data={"username": "admin@pve", "password": ADMIN_PASSWORD}
        ).json()["data"]
        admin.cookies.set("PVEAuthCookie", login["ticket"])
        admin.headers["CSRFPreventionToken"] = login["CSRFPreventionToken"]
        admin.post("/access/users", data={"userid": "bench@pve", "password": "bench-pass-1"})
        admin.put("/access/acl", data={"path": "/", "roles": "PVEAuditor", "users": "bench@pve"})
        token = admin.post("/access/users/bench@pve/token/load", data={"privsep": "0"}).json()[
            "data"
        ]
    header = f"PVEAPIToken={token['full-tokenid']}={token['value']}"
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(
            base + "/cluster/resources", headers={"Authorization": header}, verify=False
        )
        data = response.json()["data"] if response.status_code == 200 else []
        guests = [entry for entry in data if entry["type"] in {"qemu", "lxc"}]
        nodes = [entry for entry in data if entry["type"] == "node" and "maxmem" in entry]
        if len(guests) == GUESTS and len(nodes) == len(NODES):
            return header, response.content
        if time.monotonic() > deadline:
            raise SystemExit(f"the gateway shows {len(guests)} guests, {len(nodes)} nodes")
        time.sleep(0.2)


# Load -----------------------------------------------------------------------------------


def run_wrk(url: str, header: str | None, seconds: float, connections: int) -> float:
    """Requests per second measured by wrk (fails on any non-2xx answer)."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", url]
    if header:
        command[1:1] = ["-H", f"Authorization: {header}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"wrk saw errors:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])


async def _client_loop(host: str, port: int, request: bytes, until: float) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    done = 0
    while time.monotonic() < until:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(head.decode())
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
        await reader.readexactly(length)
        done += 1
    writer.close()
    return done


def python_load(url: str, header: str | None, seconds: float, connections: int) -> float:
    """Requests per second from keep-alive asyncio connections (used when wrk is missing)."""
    match = re.match(r"https://([^:/]+):(\d+)(/.*)", url)
    host, port, path = match[1], int(match[2]), match[3]
    auth = f"Authorization: {header}\r\n" if header else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n".encode()

    async def run() -> int:
        until = time.monotonic() + seconds
        counts = await asyncio.gather(
            *(_client_loop(host, port, request, until) for _ in range(connections))
        )
        return sum(counts)

    started = time.monotonic()
    total = asyncio.run(run())
    return total / (time.monotonic() - started)


def measure(url: str, header: str | None, seconds: float, connections: int) -> float:
    """Requests per second, from wrk when installed."""
    if shutil.which("wrk"):
        return run_wrk(url, header, seconds, connections)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from gateway import python_load;"
        "print(python_load(sys.argv[2], sys.argv[3] or None, float(sys.argv[4]), int(sys.argv[5])))"
    )
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(Path(__file__).parent),
            url,
            header or "",
            str(seconds),
            str(connections),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(output.strip().splitlines()[-1])


# The bare endpoint ----------------------------------------------------------------------


def serve_bare(port: int, cert: str, key: str, body_file: str) -> None:
    """A FastAPI app with one endpoint returning fixed bytes, on the gateway's uvicorn settings."""
    import uvloop
    from fastapi import FastAPI
    from fastapi.responses import Response

    from rucher.gateway.config import GatewaySettings
    from rucher.gateway.server import EmbeddedServer, server_config

    body = Path(body_file).read_bytes()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get(RESOURCES)
    async def resources() -> Response:
        return Response(body, media_type="application/json;charset=UTF-8")

    settings = GatewaySettings(
        host="127.0.0.1",
        port=port,
        cert_file=Path(cert),
        key_file=Path(key),
        generated_cert=False,
        cluster_name="bench",
    )
    uvloop.install()
    asyncio.run(EmbeddedServer(server_config(app, settings)).serve())


# The permission check -------------------------------------------------------------------


def acl_latency(entries: int = ACL_ENTRIES, queries: int = 50_000) -> tuple[float, float, float]:
    """p50 and p99 of ``allowed`` on fresh (user, path) pairs, and p99 on the same pairs again."""
    rng = random.Random(7)
    groups = [GroupRecord(groupid=f"g{i}") for i in range(200)]
    users = [
        UserRecord(userid=f"u{i}@pve", groups=(f"g{i % 200}", f"g{(i * 7) % 200}"))
        for i in range(2000)
    ]
    roles = ("PVEVMUser", "PVEVMAdmin", "PVEAuditor", "PVEDatastoreUser", "NoAccess")
    acl = []
    for i in range(entries):
        path = rng.choice(
            [
                f"/vms/{100 + rng.randrange(5000)}",
                f"/storage/s{rng.randrange(50)}",
                f"/pool/p{rng.randrange(100)}",
                f"/nodes/n{rng.randrange(3) + 1}",
                "/vms",
                "/",
            ]
        )
        if i % 3:
            subject, kind = f"u{rng.randrange(2000)}@pve", AclSubjectType.USER
        else:
            subject, kind = f"g{rng.randrange(200)}", AclSubjectType.GROUP
        acl.append(
            AclRecord(
                path=path, ugid=subject, type=kind, roleid=rng.choice(roles), propagate=bool(i % 2)
            )
        )
    state = IamState()
    state.users = {u.userid: u for u in users}
    state.groups = {g.groupid: g for g in groups}
    state.acl = {str(i): record for i, record in enumerate(acl)}
    index = state.index()
    pairs = [
        (f"u{rng.randrange(2000)}@pve", f"/vms/{100 + rng.randrange(5000)}") for _ in range(queries)
    ]
    privs = ["VM.Audit"]

    def timed() -> list[float]:
        samples = []
        for authid, path in pairs:
            started = time.perf_counter_ns()
            index.allowed(authid, path, privs)
            samples.append((time.perf_counter_ns() - started) / 1e6)
        return samples

    fresh = sorted(timed())
    again = sorted(timed())
    p = lambda s, q: s[min(len(s) - 1, int(len(s) * q))]  # noqa: E731
    return p(fresh, 0.5), p(fresh, 0.99), p(again, 0.99)


# Main -----------------------------------------------------------------------------------


def rss_mib(pid: int | None) -> float:
    """Resident memory of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def bench(args: argparse.Namespace, root: Path) -> tuple[list[float], list[float], float]:
    """Start the stack, seed it, and alternate bare and gateway runs."""
    nats = NatsServer(name="bench", store_dir=root / "nats")
    nats.start()
    nats.wait_ready()
    gateway_port, bare_port = free_port(), free_port()
    processes = [
        service("iam", root, nats.url, RUCHER_ADMIN_PASSWORD=ADMIN_PASSWORD),
        service("gateway", root, nats.url, RUCHER_GATEWAY_LISTEN=f"127.0.0.1:{gateway_port}"),
    ]
    bus = None
    bare = None
    try:
        for process in processes:
            process.start()
        base = f"https://127.0.0.1:{gateway_port}/api2/json"
        await asyncio.to_thread(wait_for, base + "/access/domains", processes)
        bus = await Bus.connect(nats.url, node="n1", service="benchagent")
        await provision(bus)
        leases = await seed(bus)
        header, body = await asyncio.to_thread(make_token, base)
        (root / "body.json").write_bytes(body)
        tls = root / "gateway" / "gateway"
        bare = ManagedProcess(
            "bare",
            [
                sys.executable,
                __file__,
                "--serve-bare",
                str(bare_port),
                str(tls / "pve-ssl.pem"),
                str(tls / "pve-ssl.key"),
                str(root / "body.json"),
            ],
            root / "bare.log",
        )
        bare.start()
        bare_url = f"https://127.0.0.1:{bare_port}{RESOURCES}"
        gateway_url = f"https://127.0.0.1:{gateway_port}{RESOURCES}"
        await asyncio.to_thread(wait_for, bare_url, [])
        tool = "wrk" if shutil.which("wrk") else "an asyncio client"
        print(
            f"resources: {len(body)} bytes ({len(NODES)} nodes, {GUESTS} guests); load from "
            f"{tool}, {args.connections} connections, {args.seconds:.0f} s a run"
        )
        bare_rates: list[float] = []
        gateway_rates: list[float] = []
        for _ in range(args.rounds):
            for url, auth, rates in (
                (bare_url, None, bare_rates),
                (gateway_url, header, gateway_rates),
            ):
                rates.append(
                    await asyncio.to_thread(measure, url, auth, args.seconds, args.connections)
                )
            print(f"  bare {bare_rates[-1]:8.0f} req/s    gateway {gateway_rates[-1]:8.0f} req/s")
        gateway_rss = rss_mib(processes[1].pid)
        for lease in leases:
            await lease.release()
        return bare_rates, gateway_rates, gateway_rss
    finally:
        if bare is not None:
            bare.stop()
        if bus is not None:
            await bus.close(grace=1.0)
        for process in reversed(processes):
            process.stop()
        nats.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-bare", nargs=4, metavar=("PORT", "CERT", "KEY", "BODY"))
    args = parser.parse_args()
    if args.serve_bare:
        port, cert, key, body = args.serve_bare
        serve_bare(int(port), cert, key, body)
        return
    with tempfile.TemporaryDirectory(prefix="rucher-bench-gateway-") as tmp:
        bare_rates, gateway_rates, gateway_rss = asyncio.run(bench(args, Path(tmp)))
    ratio = max(gateway_rates) / max(bare_rates)
    verdict = "ok" if ratio >= RATIO_TARGET else "BELOW TARGET"
    print(
        f"bare FastAPI endpoint {max(bare_rates):.0f} req/s, gateway with an API token "
        f"{max(gateway_rates):.0f} req/s (best of {args.rounds})"
    )
    print(
        f"ratio {ratio:.2f} (target >= {RATIO_TARGET}) {verdict}; "
        f"gateway RSS after the runs {gateway_rss:.1f} MiB"
    )
    p50, p99, again = acl_latency()
    verdict = "ok" if p99 <= P99_TARGET_MS else "ABOVE TARGET"
    print(
        f"permission check over {ACL_ENTRIES} ACL entries: fresh (user, path) pairs p50 "
        f"{p50:.4f} ms, p99 {p99:.4f} ms (target <= {P99_TARGET_MS}) {verdict}; "
        f"same pairs again p99 {again:.4f} ms"
    )
    print(f"RESULT gateway_ratio={ratio:.2f} acl_p99_ms={p99:.4f}")


if __name__ == "__main__":
    main()
