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
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rucher.testing import netns
from rucher.testing.harness_node import (
    CLUSTER_NAME,
    NATS_CLUSTER_PORT,
    NATS_MONITOR_PORT,
    READY_TIMEOUT,
    REGISTRY,
    Node,
    wait_until,
)
from rucher.testing.process import is_same_process_alive, process_start_ticks

if TYPE_CHECKING:
    from rucher.testing.ceph import CephCluster


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
                wait_until(node.nats_ready, READY_TIMEOUT, f"{node.name}/nats ready")
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
        wait_until(self.cluster_whole, timeout, f"harness {self.run_id}: JetStream cluster whole")

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
