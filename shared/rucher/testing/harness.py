"""N Rucher nodes on one machine, for failure tests: kill a node whole, cut its network, heal it.

Each node has its own network namespace (``rh<run>-n1``…), joined to the others by a Linux bridge
in the root namespace (``rh<run>``) through a veth pair, an address on a /24 picked for this run,
its own nats-server (the N servers form one JetStream cluster), its own state folder, and its own
processes started inside its namespace. The bridge has an address too, so tests in the root
namespace reach every node. With ``ceph=True`` one Ceph cluster, in the root namespace, listens on
that bridge address: every node's services reach the same cluster, so an ``rbd`` storage is shared
by all nodes (``RUCHER_CEPH_CONF`` in each node's service environment names it). Each run is
described in ``/tmp/rucher-harness/<run>.json`` so that ``ops/harness`` can act on it from
another process and ``prune`` can clean up after a crash.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rucher.testing import netns
from rucher.testing.libvirt import DEFAULT_BRIDGE, NodeDaemon
from rucher.testing.nats import NatsServer
from rucher.testing.process import ManagedProcess, is_same_process_alive, process_start_ticks

if TYPE_CHECKING:
    from rucher.testing.ceph import CephCluster

NATS_CLIENT_PORT = 4222
NATS_CLUSTER_PORT = 6222
NATS_MONITOR_PORT = 8222
READY_TIMEOUT = 30.0
REGISTRY = Path(tempfile.gettempdir()) / "rucher-harness"
CLUSTER_NAME = "rucher-harness"


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
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
            _wait_until(up, timeout, f"{self.name}/{process.name} ready")
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
            _wait_until(lambda: not netns.netns_pids(self.namespace), 5.0, f"{self.name} dead")

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
                _wait_until(self.nats_ready, READY_TIMEOUT, f"{self.name}/nats ready")
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


class Harness:
    """N nodes on one machine; see the module's docstring.

    The creating process owns the run: once it has died, ``prune`` tears the run down. A
    ``detached`` run (``ops/harness up``) has no owner and lives until ``ops/harness down``.
    """

    def __init__(
        self,
        size: int,
        root: Path,
        *,
        run_id: str | None = None,
        detached: bool = False,
        libvirt: bool | Collection[str] = False,
        ceph: bool = False,
    ) -> None:
        if not 1 <= size <= 200:
            raise ValueError("a harness has 1 to 200 nodes")
        self.size = size
        self.root = root
        # Which nodes run a libvirtd of their own: every one (True), none, or those named.
        self.libvirt: bool | frozenset[str] = (
            libvirt if isinstance(libvirt, bool) else frozenset(libvirt)
        )
        self.ceph: CephCluster | None = None
        if ceph:
            # Imported here: a test module's ``pytest_plugins`` may load rucher.testing.ceph later.
            from rucher.testing.ceph import CephCluster

            self.ceph = CephCluster(root / "ceph")
        self.run_id = run_id or self.new_run_id()
        self.owner_pid = 0 if detached else os.getpid()
        self.owner_ticks = None if detached else process_start_ticks(self.owner_pid)
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[Node] = []

    @staticmethod
    def new_run_id() -> str:
        """A run id no existing namespace or interface starts with."""
        taken = netns.namespaces() | netns.links()
        while True:
            run_id = secrets.token_hex(3)
            if not any(name.startswith(f"rh{run_id}") for name in taken):
                return run_id

    @property
    def bridge(self) -> str:
        """The bridge joining every node, in the root namespace."""
        return f"rh{self.run_id}"

    @property
    def bridge_address(self) -> str:
        """The root namespace's address on the bridge (the subnet's first)."""
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    @property
    def registry_file(self) -> Path:
        """Where this run is described for ``ops/harness`` and ``prune``."""
        return REGISTRY / f"{self.run_id}.json"

    @property
    def urls(self) -> list[str]:
        """Every node's NATS client URL."""
        return [node.url for node in self.nodes]

    def node(self, name: str | Node) -> Node:
        """The node called ``name`` (n1…nN)."""
        if isinstance(name, Node):
            return name
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in harness {self.run_id}")

    def start(self) -> Harness:
        """Build the network, start every nats-server and wait for one whole JetStream cluster.

        On any failure everything built so far is torn down before the error propagates.
        """
        try:
            self._build_network()
            for node in self.nodes:
                node.start_nats()
            for node in self.nodes:
                _wait_until(node.nats_ready, READY_TIMEOUT, f"{node.name}/nats ready")
            self.wait_cluster_whole()
            for node in self.nodes:
                if node.libvirt:
                    node.start_libvirtd()
            if self.ceph is not None:
                self._start_ceph(self.ceph)
            self.save()
        except BaseException:
            with contextlib.suppress(RuntimeError, OSError):
                self.stop()
            raise
        return self

    def _start_ceph(self, ceph: CephCluster) -> None:
        """Start the run's Ceph on the bridge address and tell every node's services of it."""
        ceph.host = self.bridge_address
        ceph.start()
        for node in self.nodes:
            node.ceph_conf = str(ceph.conf)

    def _build_network(self) -> None:
        with netns.subnet_lock():
            self.subnet = netns.pick_subnet()
            netns.ip("link", "add", self.bridge, "type", "bridge")
            self.save()  # from here on, prune can find what this run created
            netns.ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        netns.ip("link", "set", self.bridge, "up")
        base = self.subnet.network_address + 10
        addresses = [str(base + index) for index in range(1, self.size + 1)]  # n1 is .11
        routes = [f"nats://{address}:{NATS_CLUSTER_PORT}" for address in addresses]
        for index, address in enumerate(addresses, start=1):
            name = f"n{index}"
            node = Node.plan(
                name,
                namespace=f"rh{self.run_id}-{name}",
                address=address,
                host_veth=f"rh{self.run_id}{name}",
                state_dir=self.root / name,
                routes=[r for r in routes if r != f"nats://{address}:{NATS_CLUSTER_PORT}"],
                cluster_name=CLUSTER_NAME,
            )
            node.libvirt = self.libvirt is True or (
                not isinstance(self.libvirt, bool) and name in self.libvirt
            )
            self.nodes.append(node)
            self.save()
            netns.ip("netns", "add", node.namespace)
            netns.ip("link", "add", node.host_veth, "type", "veth",
                     "peer", "name", "eth0", "netns", node.namespace)  # fmt: skip
            netns.ip("link", "set", node.host_veth, "master", self.bridge, "up")
            netns.ip("addr", "add", f"{address}/24", "dev", "eth0", netns=node.namespace)
            netns.ip("link", "set", "eth0", "up", netns=node.namespace)
            netns.ip("link", "set", "lo", "up", netns=node.namespace)

    def jsz(self, node: str | Node) -> dict[str, Any]:
        """The node's ``/jsz`` monitoring document (JetStream and meta-cluster state)."""
        target = self.node(node)
        url = f"http://{target.address}:{NATS_MONITOR_PORT}/jsz"
        with urllib.request.urlopen(url, timeout=2) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def cluster_whole(self) -> bool:
        """Whether every node is up, reachable, and a current member of the JetStream meta group."""
        if any(not node.alive or node.cut_off or not node.nats_ready() for node in self.nodes):
            return False
        if self.size == 1:
            return True
        try:
            views = [self.jsz(node).get("meta_cluster", {}) for node in self.nodes]
        except OSError:
            return False
        names = {node.name for node in self.nodes}
        leaders = {view.get("leader") for view in views}
        if len(leaders) != 1 or not leaders <= names:
            return False
        leader = self.jsz(leaders.pop() or "").get("meta_cluster", {})
        replicas = leader.get("replicas", [])
        return (
            leader.get("cluster_size") == self.size
            and {replica["name"] for replica in replicas} == names - {leader.get("leader")}
            and all(replica.get("current") and not replica.get("offline") for replica in replicas)
        )

    def wait_cluster_whole(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until ``cluster_whole``."""
        _wait_until(self.cluster_whole, timeout, f"harness {self.run_id}: JetStream cluster whole")

    def kill(self, node: str | Node) -> None:
        """Crash the node: SIGKILL every process it owns (its network stays)."""
        self.node(node).kill()
        self.save()

    def restart(self, node: str | Node) -> None:
        """Crash the node if it runs, then start its processes again (NATS first, same store)."""
        target = self.node(node)
        target.kill()
        target.start_all()
        self.save()

    def cut(self, node: str | Node) -> None:
        """Isolate the node's network (its veth goes down); its processes keep running."""
        target = self.node(node)
        netns.ip("link", "set", target.host_veth, "down")
        target.cut_off = True
        self.save()

    def heal(self, node: str | Node) -> None:
        """Reconnect a cut node."""
        target = self.node(node)
        netns.ip("link", "set", target.host_veth, "up")
        target.cut_off = False
        self.save()

    def stop(self) -> None:
        """Tear everything down (processes, veths, namespaces, bridge), whatever state it is in.

        Every step is tried; what could not be removed is reported at the end.
        """
        problems = []
        for node in self.nodes:
            try:
                # A cut-off nats-server can take seconds to shut down cleanly, for nothing.
                node.stop(timeout=0.0 if node.cut_off else 2.0)
            except (OSError, RuntimeError) as err:
                problems.append(f"{node.name}: {err}")
        if self.ceph is not None:
            try:
                self.ceph.stop()
            except (OSError, RuntimeError) as err:
                problems.append(f"ceph: {err}")
        for node in self.nodes:
            netns.ip("link", "del", node.host_veth, check=False)
            netns.ip("netns", "del", node.namespace, check=False)
            if node.libvirt:
                (REGISTRY / node.namespace).unlink(missing_ok=True)
        netns.ip("link", "del", self.bridge, check=False)
        leftovers = sorted(
            ({node.namespace for node in self.nodes} & netns.namespaces())
            | ({self.bridge, *(node.host_veth for node in self.nodes)} & netns.links())
        )
        if leftovers:
            problems.append(f"could not remove {', '.join(leftovers)}")
        if problems:
            raise RuntimeError(f"harness {self.run_id} teardown: " + "; ".join(problems))
        self.registry_file.unlink(missing_ok=True)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the run (what the registry file holds)."""
        return {
            "run_id": self.run_id,
            "size": self.size,
            "root": str(self.root),
            "libvirt": self.libvirt if isinstance(self.libvirt, bool) else sorted(self.libvirt),
            "ceph": str(self.ceph.root) if self.ceph is not None else None,
            "owner_pid": self.owner_pid,
            "owner_ticks": self.owner_ticks,
            "subnet": str(self.subnet) if self.subnet else None,
            "bridge": self.bridge,
            "nodes": [node.to_dict() for node in self.nodes],
        }

    def save(self) -> None:
        """Write the registry file (atomically)."""
        REGISTRY.mkdir(parents=True, exist_ok=True)
        partial = self.registry_file.with_suffix(".tmp")
        partial.write_text(json.dumps(self.describe(), indent=2) + "\n")
        partial.replace(self.registry_file)

    @classmethod
    def load(cls, run_id: str) -> Harness:
        """Find a run again from its registry file (processes are tracked by pid from then on)."""
        data = json.loads((REGISTRY / f"{run_id}.json").read_text())
        harness = cls(
            data["size"],
            Path(data["root"]),
            run_id=data["run_id"],
            detached=True,
            libvirt=data.get("libvirt", False),
        )
        if data.get("ceph") and (Path(data["ceph"]) / "cluster.json").is_file():
            from rucher.testing.ceph import CephCluster

            harness.ceph = CephCluster.load(Path(data["ceph"]))
        harness.owner_pid = data["owner_pid"]
        harness.owner_ticks = data["owner_ticks"]
        harness.subnet = ipaddress.IPv4Network(data["subnet"]) if data["subnet"] else None
        harness.nodes = [Node.from_dict(node, CLUSTER_NAME) for node in data["nodes"]]
        return harness

    @property
    def owner_alive(self) -> bool:
        """Whether the process that owns this run still runs (a detached run has no owner)."""
        return bool(self.owner_pid) and is_same_process_alive(self.owner_pid, self.owner_ticks)


def registered_runs() -> list[str]:
    """Run ids with a registry file."""
    return sorted(path.stem for path in REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []


def prune(*, include_detached: bool = False) -> list[str]:
    """Tear down runs whose owner died (and, with ``include_detached``, ``ops/harness`` runs).

    Namespaces and bridges named like a harness's but with no registry file are removed too.
    Returns the run ids removed.
    """
    removed = []
    with netns.subnet_lock():  # a run being created holds it until its registry file exists
        for run_id in registered_runs():
            try:
                harness = Harness.load(run_id)
            except (OSError, ValueError, KeyError):
                continue  # unreadable: leave it to a person rather than guess
            detached = not harness.owner_pid
            if harness.owner_alive or (detached and not include_detached):
                continue
            harness.stop()
            removed.append(run_id)
        known = set(registered_runs())
        orphans = {
            name[2:8]
            for name in netns.namespaces() | netns.links()
            if _looks_like_harness(name) and name[2:8] not in known
        }
    for run_id in sorted(orphans):
        for name in sorted(netns.namespaces()):
            if name.startswith(f"rh{run_id}-"):
                for pid in netns.netns_pids(name):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                netns.ip("netns", "del", name, check=False)
        for name in sorted(netns.links()):
            if name.startswith(f"rh{run_id}"):
                netns.ip("link", "del", name, check=False)
        for link in REGISTRY.glob(f"rh{run_id}-*"):  # short links to node libvirtd folders
            link.unlink(missing_ok=True)
        removed.append(run_id)
    return removed


def _looks_like_harness(name: str) -> bool:
    run_id = name[2:8]
    return (
        name.startswith("rh")
        and len(run_id) == 6
        and all(c in "0123456789abcdef" for c in run_id)
        and (len(name) == 8 or name[8:].lstrip("-").startswith("n"))
    )
