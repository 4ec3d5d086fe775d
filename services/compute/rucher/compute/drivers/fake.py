"""An in-memory hypervisor for unit tests of the service's logic (never a driver's only test)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rucher.bus import RucherError
from rucher.compute.drivers.interface import DomainInfo, MigrationTarget, NodeFacts
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode

_NAME = re.compile(r"<name>([^<]+)</name>")
_MEMORY = re.compile(r"<memory unit=\"MiB\">(\d+)</memory>")


@dataclass
class FakeDomain:
    """One defined domain: its XML and run state."""

    xml: str
    state: PowerState = PowerState.STOPPED
    saved: set[str] = field(default_factory=set)
    migrating: bool = False
    migrated: bool = False


@dataclass
class FakeHypervisor:
    """Domains in a dict; ``refuse_define`` makes the next defines fail as libvirt would."""

    kvm: bool = False
    facts: NodeFacts = field(
        default_factory=lambda: NodeFacts(
            arch="x86_64",
            cpu_model="Fake CPU",
            cpus=4,
            sockets=1,
            memory_total=8 << 30,
            memory_used=1 << 30,
        )
    )
    host_bridges: frozenset[str] = frozenset({"vmbr0"})
    domains_by_name: dict[str, FakeDomain] = field(default_factory=dict)
    refuse_define: str | None = None
    ignore_shutdown: bool = False
    refuse_attach: str | None = None
    calls: list[tuple[str, str]] = field(default_factory=list)
    secrets: dict[str, bytes] = field(default_factory=dict)
    peers: dict[str, FakeHypervisor] = field(default_factory=dict)
    refuse_migrate: str | None = None
    saved_states: dict[str, str] = field(default_factory=dict)

    def _get(self, name: str) -> FakeDomain:
        domain = self.domains_by_name.get(name)
        if domain is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"domain {name} is not defined on this node")
        return domain

    def _running(self, name: str) -> FakeDomain:
        domain = self._get(name)
        if domain.state is PowerState.STOPPED:
            raise RucherError(ErrorCode.INTERNAL, "libvirt: domain is not running")
        return domain

    async def define(self, xml: str) -> None:
        """Keep the XML, unless told to refuse it."""
        found = _NAME.search(xml)
        if found is None or self.refuse_define:
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: {self.refuse_define or 'no name'}")
        self.calls.append(("define", found[1]))
        existing = self.domains_by_name.get(found[1])
        state = existing.state if existing else PowerState.STOPPED
        saved = existing.saved if existing else set()
        self.domains_by_name[found[1]] = FakeDomain(xml=xml, state=state, saved=saved)

    async def undefine(self, name: str) -> None:
        """Forget a domain."""
        self.calls.append(("undefine", name))
        self.domains_by_name.pop(name, None)

    async def start(self, name: str) -> None:
        """Mark running."""
        domain = self._get(name)
        if domain.state is not PowerState.STOPPED:
            raise RucherError(ErrorCode.INTERNAL, "libvirt: domain is already running")
        self.calls.append(("start", name))
        domain.state = PowerState.RUNNING
        domain.migrated = False

    async def stop(self, name: str) -> None:
        """Mark stopped."""
        self.calls.append(("stop", name))
        self._get(name).state = PowerState.STOPPED

    async def shutdown(self, name: str) -> None:
        """Power off at once, unless the guest ignores ACPI."""
        domain = self._running(name)
        self.calls.append(("shutdown", name))
        if not self.ignore_shutdown:
            domain.state = PowerState.STOPPED

    async def reboot(self, name: str) -> None:
        """Nothing visible changes."""
        self._running(name)
        self.calls.append(("reboot", name))

    async def reset(self, name: str) -> None:
        """Nothing visible changes."""
        self._running(name)
        self.calls.append(("reset", name))

    async def suspend(self, name: str) -> None:
        """Mark paused."""
        self._running(name).state = PowerState.PAUSED
        self.calls.append(("suspend", name))

    async def resume(self, name: str) -> None:
        """Mark running again."""
        self._running(name).state = PowerState.RUNNING
        self.calls.append(("resume", name))

    def _info(self, name: str, domain: FakeDomain) -> DomainInfo:
        found = _MEMORY.search(domain.xml)
        memory = int(found[1]) << 20 if found else 0
        active = domain.state is not PowerState.STOPPED
        return DomainInfo(
            name=name,
            state=domain.state,
            memory=memory if active else 0,
            max_memory=memory,
            vcpus=1,
            uptime=1.0 if active else 0.0,
        )

    async def info(self, name: str) -> DomainInfo | None:
        """The domain's state, or None."""
        domain = self.domains_by_name.get(name)
        return None if domain is None else self._info(name, domain)

    async def domains(self) -> list[DomainInfo]:
        """Every domain."""
        return [self._info(name, domain) for name, domain in self.domains_by_name.items()]

    async def node(self) -> NodeFacts:
        """The configured facts."""
        return self.facts

    async def bridges(self) -> frozenset[str]:
        """The configured bridges."""
        return self.host_bridges

    async def save_vm(self, name: str, snapname: str) -> None:
        """Remember the RAM snapshot."""
        self._running(name).saved.add(snapname)
        self.calls.append(("save_vm", f"{name}:{snapname}"))

    async def load_vm(self, name: str, snapname: str) -> None:
        """Refuse an unknown RAM snapshot, as QEMU does."""
        domain = self._running(name)
        if snapname not in domain.saved:
            raise RucherError(ErrorCode.INTERNAL, f"qemu: loadvm: snapshot {snapname} not found")
        domain.state = PowerState.RUNNING
        self.calls.append(("load_vm", f"{name}:{snapname}"))

    async def delete_vm_snapshot(self, name: str, snapname: str) -> None:
        """Forget the snapshot."""
        self._running(name).saved.discard(snapname)
        self.calls.append(("delete_vm_snapshot", f"{name}:{snapname}"))

    async def snapshot_disks(self, name: str, snapname: str, sources: list[str]) -> None:
        """Record the live disk snapshot."""
        self._running(name)
        self.calls.append(("snapshot_disks", f"{name}:{snapname}:{','.join(sources)}"))

    async def block_resize(self, name: str, source: str, size: int) -> None:
        """Record the live resize."""
        self._running(name)
        self.calls.append(("block_resize", f"{name}:{source}:{size}"))

    async def attach_device(self, name: str, xml: str) -> None:
        """Record the hot-plug; ``refuse_attach`` makes it fail as QEMU would."""
        self._running(name)
        if self.refuse_attach is not None and self.refuse_attach in xml:
            raise RucherError(ErrorCode.INTERNAL, "libvirt: unable to execute QEMU command")
        self.calls.append(("attach_device", f"{name}:{xml}"))

    async def define_secret(self, usage: str, value: bytes) -> None:
        """Keep the secret's value by usage."""
        self.calls.append(("define_secret", usage))
        self.secrets[usage] = value

    async def start_paused(self, name: str) -> None:
        """Mark paused."""
        domain = self._get(name)
        if domain.state is not PowerState.STOPPED:
            raise RucherError(ErrorCode.INTERNAL, "libvirt: domain is already running")
        self.calls.append(("start_paused", name))
        domain.state = PowerState.PAUSED

    async def migrate(self, name: str, target: MigrationTarget) -> None:
        """Move the running domain to the peer registered under ``target.peer_uri``."""
        domain = self._running(name)
        peer = self.peers.get(target.peer_uri)
        if peer is None or self.refuse_migrate:
            reason = self.refuse_migrate or f"cannot reach {target.peer_uri}"
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: {reason}")
        self.calls.append(("migrate", f"{name}:{target.peer_uri}"))
        if target.copy_sources:
            self.calls.append(("copy_disks", ",".join(target.copy_sources)))
        peer.domains_by_name[name] = FakeDomain(xml=target.domain_xml, state=domain.state)
        domain.state = PowerState.STOPPED
        domain.migrated = True

    async def save(self, name: str, path: str) -> None:
        """Stop the running domain, remembering it under ``path``."""
        domain = self._running(name)
        self.calls.append(("save", f"{name}:{path}"))
        self.saved_states[path] = name
        domain.state = PowerState.STOPPED

    async def restore(self, path: str) -> None:
        """Run the domain saved under ``path`` again."""
        name = self.saved_states.pop(path, None)
        if name is None:
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: no saved state in {path}")
        self.calls.append(("restore", f"{name}:{path}"))
        self._get(name).state = PowerState.RUNNING

    async def abort_job(self, name: str) -> bool:
        """End a migration marked in progress (``migrating``): the domain stays here."""
        domain = self._get(name)
        self.calls.append(("abort_job", name))
        was, domain.migrating = domain.migrating, False
        return was

    async def migrated_away(self, name: str) -> bool:
        """Whether ``migrate`` moved the domain away (and it was not started here since)."""
        domain = self._get(name)
        return domain.migrated and domain.state is PowerState.STOPPED
