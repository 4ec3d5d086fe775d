"""What the compute service needs from a hypervisor: define, run and observe domains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rucher.proto.common import PowerState


@dataclass(frozen=True)
class DomainInfo:
    """One domain as the hypervisor sees it now."""

    name: str
    state: PowerState
    memory: int = 0
    max_memory: int = 0
    vcpus: int = 0
    cpu_time_ns: int = 0
    pid: int | None = None
    uptime: float = 0.0


@dataclass(frozen=True)
class MigrationTarget:
    """Where a live migration goes: the peer libvirtd, QEMU's stream, the domain there."""

    peer_uri: str
    migrate_uri: str
    domain_xml: str
    bandwidth_kib: int = 0
    tunnelled: bool = False
    # Local disks (their source paths here) copied to the target's twins during the migration.
    copy_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeFacts:
    """The host under the hypervisor: CPUs, memory and load, for capacity and admission."""

    arch: str
    cpu_model: str
    cpus: int
    sockets: int
    memory_total: int
    memory_used: int
    cpu_flags: tuple[str, ...] = ()
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    uptime: float = 0.0


class Hypervisor(Protocol):
    """A node's hypervisor; every method may block, so drivers run them off the event loop."""

    kvm: bool

    async def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain from its XML."""

    async def undefine(self, name: str) -> None:
        """Remove a stopped domain's definition; a missing domain is not an error."""

    async def start(self, name: str) -> None:
        """Start a defined domain."""

    async def stop(self, name: str) -> None:
        """Stop a domain at once (pull the plug); a stopped domain is not an error."""

    async def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button)."""

    async def reboot(self, name: str) -> None:
        """Ask the guest to reboot (ACPI)."""

    async def reset(self, name: str) -> None:
        """Reset the domain's virtual hardware."""

    async def suspend(self, name: str) -> None:
        """Pause the domain's vCPUs."""

    async def resume(self, name: str) -> None:
        """Resume a paused domain."""

    async def info(self, name: str) -> DomainInfo | None:
        """The domain's state and counters, or None when it is not defined."""

    async def domains(self) -> list[DomainInfo]:
        """Every domain defined or running on this node."""

    async def node(self) -> NodeFacts:
        """The host's CPUs, memory and load now."""

    async def bridges(self) -> frozenset[str]:
        """Names of the Linux bridges a guest NIC may join."""

    async def save_vm(self, name: str, snapname: str) -> None:
        """Snapshot a running domain with its RAM inside its qcow2 images (``savevm``)."""

    async def load_vm(self, name: str, snapname: str) -> None:
        """Load a :meth:`save_vm` snapshot, RAM and disks, into the running domain (``loadvm``)."""

    async def delete_vm_snapshot(self, name: str, snapname: str) -> None:
        """Delete a running domain's internal snapshot from every image (``delvm``)."""

    async def snapshot_disks(self, name: str, snapname: str, sources: list[str]) -> None:
        """Snapshot the qcow2 images ``sources`` of a running domain at once, without RAM."""

    async def block_resize(self, name: str, source: str, size: int) -> None:
        """Tell a running domain its disk ``source`` (a path or RBD name) is now ``size`` bytes."""

    async def attach_device(self, name: str, xml: str) -> None:
        """Hot-plug a device (a ``<disk>`` or ``<interface>`` element) into a running domain."""

    async def define_secret(self, usage: str, value: bytes) -> None:
        """Define (or update) the ``ceph`` secret named ``usage`` with ``value`` (the raw key)."""

    async def start_paused(self, name: str) -> None:
        """Start a defined domain with its vCPUs paused (it runs no guest code)."""

    async def save(self, name: str, path: str) -> None:
        """Write running domain ``name``'s whole state to the file ``path`` and stop it."""

    async def restore(self, path: str) -> None:
        """Run the domain again from the state :meth:`save` wrote to ``path``."""

    async def abort_job(self, name: str) -> bool:
        """Abort the domain's running job (an outgoing migration) and wait until it has ended.

        Returns whether there was one; an aborted migration leaves the domain running here.
        """

    async def migrated_away(self, name: str) -> bool:
        """Whether the domain is stopped here because a migration moved it to another host."""

    async def migrate(self, name: str, target: MigrationTarget) -> None:
        """Move running domain ``name`` to ``target``'s hypervisor; on failure it runs here still.

        The target's domain is persistent with ``target.domain_xml``; this node's definition
        stays (stopped) until it is undefined.
        """
