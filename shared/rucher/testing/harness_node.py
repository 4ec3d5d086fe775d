"""One node of the multi-node harness (:mod:`rucher.testing.harness`).

A node is a network namespace with its address, its nats-server, its state folder and the
processes started inside the namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rucher.testing import netns
from rucher.testing.libvirt import DEFAULT_BRIDGE, NodeDaemon
from rucher.testing.nats import NatsServer
from rucher.testing.process import ManagedProcess

NATS_CLIENT_PORT = 4222
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
READY_TIMEOUT = 30.0
REGISTRY = Path(tempfile.gettempdir()) / "rucher-harness"
CLUSTER_NAME = "rucher-harness"


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it holds; raise ``TimeoutError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


@dataclass
class Node:
    """One Rucher node: a network namespace, an address, a nats-server and other processes.

    ``processes`` lists what the node owns in start order (``nats`` first); later kinds of
    process (libvirtd, an LXD daemon, a Ceph OSD) are added with ``start_process``.
    """

    name: str
    namespace: str
    address: str
    host_veth: str
    state_dir: Path
    nats: NatsServer
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    readiness: dict[str, tuple[Callable[[], bool], float]] = field(default_factory=dict, repr=False)
    cut_off: bool = False
    libvirt: bool = False
    ceph_conf: str | None = None

    @property
    def wrap(self) -> list[str]:
        """The prefix that runs a command inside this node's namespace."""
        return ["ip", "netns", "exec", self.namespace]

    @property
    def log_dir(self) -> Path:
        """One log file per process."""
        return self.state_dir / "logs"

    @property
    def url(self) -> str:
        """This node's NATS client URL (reachable from the root namespace and every node)."""
        return self.nats.url

    @property
    def libvirtd(self) -> NodeDaemon:
        """This node's own libvirtd (running only when the harness was built with libvirt)."""
        return NodeDaemon(
            root=self.state_dir / "libvirt",
            address=self.address,
            host_uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"rucher-harness:{self.namespace}")),
            link=REGISTRY / self.namespace,
        )

    def service_env(self, service: str) -> dict[str, str]:
        """The environment a Rucher service on this node gets (as ``ops/up`` gives it).

        ``RUCHER_NATS_URL`` lists this node's server first, then the other members. With a
        libvirtd of its own, the node's services are told how to reach it and its peers.
        """
        cluster, client = f":{NATS_CLUSTER_PORT}", f":{NATS_CLIENT_PORT}"
        others = [route.replace(cluster, client) for route in self.nats.routes]
        env = {
            "RUCHER_NATS_URL": ",".join([self.url, *others]),
            "RUCHER_NODE": self.name,
            "RUCHER_STATE_DIR": str(self.state_dir / "data" / service),
            "RUCHER_LOG_FORMAT": "json",
        }
        if self.ceph_conf is not None:
            env["RUCHER_CEPH_CONF"] = self.ceph_conf
        if self.libvirt:
            daemon = self.libvirtd
            env |= {
                "RUCHER_LIBVIRT_URI": daemon.uri,
                "RUCHER_LIBVIRT_QEMU_PID_DIR": str(daemon.qemu_pid_dir),
                "RUCHER_COMPUTE_MIGRATION_ADDRESS": self.address,
            }
        return env

    def start_libvirtd(self) -> ManagedProcess:
        """Start the node's libvirtd and virtlogd, with an isolated ``vmbr0`` for its guests."""
        netns.ip("link", "add", DEFAULT_BRIDGE, "type", "bridge", netns=self.namespace)
        netns.ip("link", "set", DEFAULT_BRIDGE, "up", netns=self.namespace)
        daemon = self.libvirtd
        daemon.prepare()
        return self.start_process("libvirtd", daemon.argv(), ready=daemon.answers)

    def start_process(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        ready: Callable[[], bool] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> ManagedProcess:
        """Start ``argv`` inside the namespace as one of this node's processes.

        With ``ready``, wait until it returns True (raising, with the log's end, if the process
        dies or ``timeout`` passes); it is kept so ``restart`` waits for it again.
        """
        if name in self.processes and self.processes[name].alive:
            raise RuntimeError(f"{self.name}: a process named {name} already runs")
        process = ManagedProcess(name, [*self.wrap, *argv], self.log_dir / f"{name}.log", env or {})
        self.processes[name] = process
        if ready is not None:
            self.readiness[name] = (ready, timeout)
        self._launch(process)
        return process

    def start_service(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        ready: Callable[[], bool] | None = None,
    ) -> ManagedProcess:
        """Start a Rucher service with the node's RUCHER_* environment (``env`` adds to it)."""
        environment = {**self.service_env(name), **(env or {})}
        return self.start_process(name, argv, environment, ready=ready)

    def _launch(self, process: ManagedProcess) -> None:
        process.start()
        if process.name not in self.readiness:
            return
        ready, timeout = self.readiness[process.name]

        def up() -> bool:
            if not process.alive:
                raise RuntimeError(f"{self.name}/{process.name} exited:\n{process.tail_log()}")
            return ready()

        try:
            wait_until(up, timeout, f"{self.name}/{process.name} ready")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{process.tail_log()}") from err

    def start_nats(self) -> None:
        """Start this node's nats-server (its command already runs it inside the namespace)."""
        process = ManagedProcess("nats", self.nats.command(), self.log_dir / "nats.log")
        others = {name: other for name, other in self.processes.items() if name != "nats"}
        self.processes = {"nats": process, **others}
        process.start()

    def nats_ready(self) -> bool:
        """Whether this node's nats-server answers ``/healthz`` (JetStream included)."""
        return self.nats.healthz(js_only=True) and self.nats.healthz()

    @property
    def alive(self) -> bool:
        """Whether this node's nats-server runs."""
        return "nats" in self.processes and self.processes["nats"].alive

    def kill(self) -> None:
        """SIGKILL every process the node owns, and anything else inside its namespace.

        Returns once they are gone: a QEMU with a large guest takes a moment to die.
        """
        for process in self.processes.values():
            process.signal_group(signal.SIGKILL)
        for pid in netns.netns_pids(self.namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes.values():
            process.wait(5.0)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not netns.netns_pids(self.namespace), 5.0, f"{self.name} dead")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every process (SIGTERM, newest first, then SIGKILL) and all else in the netns."""
        for process in reversed(self.processes.values()):
            process.stop(timeout)
        self.kill()

    def start_all(self) -> None:
        """Start the node's processes again in order, NATS first (after a kill).

        A cut node cannot be watched from outside: its processes start without waiting.
        """
        for name, process in self.processes.items():
            if self.cut_off:
                process.start()
            elif name == "nats":
                process.start()
                wait_until(self.nats_ready, READY_TIMEOUT, f"{self.name}/nats ready")
            else:
                self._launch(process)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (readiness checks are not kept)."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "address": self.address,
            "host_veth": self.host_veth,
            "state_dir": str(self.state_dir),
            "routes": self.nats.routes,
            "cut_off": self.cut_off,
            "libvirt": self.libvirt,
            "ceph_conf": self.ceph_conf,
            "processes": [process.to_dict() for process in self.processes.values()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], cluster_name: str) -> Node:
        """Rebuild a node described by ``to_dict``."""
        node = cls.plan(
            data["name"],
            namespace=data["namespace"],
            address=data["address"],
            host_veth=data["host_veth"],
            state_dir=Path(data["state_dir"]),
            routes=data["routes"],
            cluster_name=cluster_name,
        )
        node.cut_off = data["cut_off"]
        node.libvirt = data.get("libvirt", False)
        node.ceph_conf = data.get("ceph_conf")
        node.processes = {p["name"]: ManagedProcess.from_dict(p) for p in data["processes"]}
        return node

    @classmethod
    def plan(
        cls,
        name: str,
        *,
        namespace: str,
        address: str,
        host_veth: str,
        state_dir: Path,
        routes: list[str],
        cluster_name: str,
    ) -> Node:
        """A node whose nats-server listens on ``address`` inside ``namespace``."""
        nats = NatsServer(
            name=name,
            store_dir=state_dir / "nats",
            host=address,
            client_port=NATS_CLIENT_PORT,
            # A lone node is no cluster: with cluster settings it would wait for peers forever.
            cluster_port=NATS_CLUSTER_PORT if routes else 0,
            monitor_port=NATS_MONITOR_PORT,
            routes=routes,
            cluster_name=cluster_name,
            wrap=["ip", "netns", "exec", namespace],
            log_file=state_dir / "logs" / "nats.log",
        )
        return cls(name, namespace, address, host_veth, state_dir, nats)
