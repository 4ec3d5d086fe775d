"""The libvirt driver: every libvirt call runs in ``asyncio.to_thread``, never on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt  # type: ignore[import-untyped]
import libvirt_qemu  # type: ignore[import-untyped]

from rucher.bus import RucherError
from rucher.compute.drivers.interface import DomainInfo, MigrationTarget, NodeFacts
from rucher.proto.common import PowerState
from rucher.proto.errors import ErrorCode

T = TypeVar("T")

QEMU_PIDS = Path("/run/libvirt/qemu")
# How long an aborted job (a migration) may take to end.
JOB_PATIENCE = 60.0
SYS_NET = Path("/sys/class/net")
STATES = {
    libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return tuple(sorted(set(line.split(":", 1)[1].split())))
    return ()


def _process_uptime(pid: int) -> float:
    """Seconds since process ``pid`` started, from /proc (field 22 of stat, in clock ticks)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, boot_uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    return fields


def kvm_usable(cpuinfo: Path = Path("/proc/cpuinfo"), device: Path = Path("/dev/kvm")) -> bool:
    """Whether KVM really works: /dev/kvm alone lies on nested hosts without vmx/svm."""
    if not device.exists():
        return False
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"vmx", "svm"})


class LibvirtHypervisor:
    """Domains of one libvirtd (``qemu:///system`` by default)."""

    def __init__(self, uri: str, *, kvm: bool, qemu_pids: Path = QEMU_PIDS) -> None:
        self.uri = uri
        self.kvm = kvm
        self.qemu_pids = qemu_pids
        self._connection: Any = None
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        with self._lock:
            if self._connection is None or not self._connection.isAlive():
                self._connection = libvirt.open(self.uri)
            return self._connection

    async def _call(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(work)
        except libvirt.libvirtError as err:
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: {err.get_error_message()}") from err

    def _lookup(self, name: str) -> Any:
        try:
            return self._conn().lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain(self, name: str) -> Any:
        domain = self._lookup(name)
        if domain is None:
            raise RucherError(ErrorCode.NOT_FOUND, f"domain {name} is not defined on this node")
        return domain

    async def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain."""
        await self._call(lambda: self._conn().defineXML(xml))

    async def undefine(self, name: str) -> None:
        """Remove a stopped domain's definition (and its NVRAM)."""

        def work() -> None:
            domain = self._lookup(name)
            if domain is not None:
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

        await self._call(work)

    async def start(self, name: str) -> None:
        """Start a defined domain."""
        await self._call(lambda: self._domain(name).create())

    async def stop(self, name: str) -> None:
        """Destroy (hard-stop) a running domain."""

        def work() -> None:
            domain = self._domain(name)
            if domain.isActive():
                domain.destroy()

        await self._call(work)

    async def shutdown(self, name: str) -> None:
        """ACPI power button."""
        await self._call(
            lambda: self._domain(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        )

    async def reboot(self, name: str) -> None:
        """ACPI reboot request."""
        await self._call(
            lambda: self._domain(name).reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
        )

    async def reset(self, name: str) -> None:
        """Hardware reset."""
        await self._call(lambda: self._domain(name).reset(0))

    async def suspend(self, name: str) -> None:
        """Pause the vCPUs."""
        await self._call(lambda: self._domain(name).suspend())

    async def resume(self, name: str) -> None:
        """Resume paused vCPUs."""
        await self._call(lambda: self._domain(name).resume())

    def _info(self, domain: Any) -> DomainInfo:
        state, max_kib, kib, vcpus, cpu_time = domain.info()
        name = domain.name()
        pid: int | None = None
        uptime = 0.0
        if state in STATES:
            try:
                pid = int((self.qemu_pids / f"{name}.pid").read_text().strip())
                uptime = _process_uptime(pid)
            except (OSError, ValueError, IndexError):
                pid = None  # a remote or session URI: no pid file here
        return DomainInfo(
            name=name,
            state=STATES.get(state, PowerState.STOPPED),
            memory=kib * 1024 if state in STATES else 0,
            max_memory=max_kib * 1024,
            vcpus=vcpus,
            cpu_time_ns=cpu_time,
            pid=pid,
            uptime=uptime,
        )

    async def info(self, name: str) -> DomainInfo | None:
        """State and counters of one domain."""

        def work() -> DomainInfo | None:
            domain = self._lookup(name)
            return None if domain is None else self._info(domain)

        return await self._call(work)

    async def domains(self) -> list[DomainInfo]:
        """Every domain of this libvirtd."""
        return await self._call(
            lambda: [self._info(domain) for domain in self._conn().listAllDomains()]
        )

    async def node(self) -> NodeFacts:
        """The node info of libvirt (CPUs, sockets) with /proc's memory use, flags and load."""

        def work() -> NodeFacts:
            model, _memory_mib, cpus, _mhz, numa_nodes, sockets, _cores, _threads = (
                self._conn().getInfo()
            )
            memory = _meminfo()
            total = memory.get("MemTotal", 0)
            load = os.getloadavg()
            return NodeFacts(
                arch=platform.machine() or str(model),
                cpu_model=_cpu_model() or str(model),
                cpus=int(cpus),
                sockets=max(1, int(sockets) * int(numa_nodes)),
                memory_total=total,
                memory_used=max(0, total - memory.get("MemAvailable", total)),
                cpu_flags=_cpu_flags(),
                loadavg=(load[0], load[1], load[2]),
                uptime=time.clock_gettime(time.CLOCK_BOOTTIME),
            )

        return await self._call(work)

    async def bridges(self) -> frozenset[str]:
        """Linux bridges of this host (interfaces with a ``bridge`` folder in sysfs)."""

        def work() -> frozenset[str]:
            if not SYS_NET.is_dir():
                return frozenset()
            return frozenset(path.name for path in SYS_NET.iterdir() if (path / "bridge").is_dir())

        return await asyncio.to_thread(work)

    # The QEMU monitor: internal snapshots of running domains, live disk growth -------------

    def _hmp(self, name: str, command: str) -> None:
        """Run a human-monitor command; HMP reports failures as text, not as an error."""
        out = libvirt_qemu.qemuMonitorCommand(
            self._domain(name), command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
        text = str(out or "").strip()
        if text:
            raise RucherError(ErrorCode.INTERNAL, f"qemu: {command.split(maxsplit=1)[0]}: {text}")

    def _qmp(self, name: str, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            message["arguments"] = arguments
        out = libvirt_qemu.qemuMonitorCommand(self._domain(name), json.dumps(message), 0)
        reply = json.loads(out)
        if "error" in reply:
            raise RucherError(
                ErrorCode.INTERNAL, f"qemu: {execute}: {reply['error'].get('desc', reply)}"
            )
        return reply.get("return")

    async def save_vm(self, name: str, snapname: str) -> None:
        """``savevm``: RAM, device state and every disk into internal qcow2 snapshots."""
        await self._call(lambda: self._hmp(name, f"savevm {snapname}"))

    async def load_vm(self, name: str, snapname: str) -> None:
        """``loadvm``: back to a ``savevm`` snapshot; the domain runs on from there."""

        def work() -> None:
            self._hmp(name, f"loadvm {snapname}")
            domain = self._domain(name)
            if domain.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
                domain.resume()

        await self._call(work)

    async def delete_vm_snapshot(self, name: str, snapname: str) -> None:
        """``delvm``: drop an internal snapshot from every image of the running domain."""
        await self._call(lambda: self._hmp(name, f"delvm {snapname}"))

    async def snapshot_disks(self, name: str, snapname: str, sources: list[str]) -> None:
        """One QMP transaction of ``blockdev-snapshot-internal-sync``, one per image."""

        def work() -> None:
            nodes: dict[str, str] = {}
            for device in self._qmp(name, "query-block") or []:
                inserted = device.get("inserted") or {}
                if inserted.get("file") and inserted.get("node-name"):
                    nodes[str(inserted["file"])] = str(inserted["node-name"])
            missing = [source for source in sources if source not in nodes]
            if missing:
                raise RucherError(
                    ErrorCode.INTERNAL, f"qemu: no block node for {', '.join(missing)}"
                )
            actions = [
                {
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": nodes[source], "name": snapname},
                }
                for source in sources
            ]
            self._qmp(name, "transaction", {"actions": actions})

        await self._call(work)

    async def attach_device(self, name: str, xml: str) -> None:
        """``attachDeviceFlags`` on the live domain (the next start redefines it from config)."""
        await self._call(
            lambda: self._domain(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        )

    async def block_resize(self, name: str, source: str, size: int) -> None:
        """Grow with libvirt ``blockResize`` the disk whose source is ``source``, in bytes."""

        def work() -> None:
            domain = self._domain(name)
            target = _disk_target(domain.XMLDesc(0), source)
            if target is None:
                raise RucherError(ErrorCode.NOT_FOUND, f"domain {name} has no disk {source}")
            domain.blockResize(target, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)

        await self._call(work)

    async def define_secret(self, usage: str, value: bytes) -> None:
        """Define the ``ceph`` secret ``usage`` once (private, persistent), then set its value."""

        def work() -> None:
            connection = self._conn()
            try:
                secret = connection.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise
                secret = connection.secretDefineXML(_secret_xml(usage))
            secret.setValue(value)

        await self._call(work)

    async def start_paused(self, name: str) -> None:
        """Start a defined domain with its vCPUs paused."""
        await self._call(
            lambda: self._domain(name).createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        )

    async def save(self, name: str, path: str) -> None:
        """``virDomainSave``: QEMU streams the guest's state into ``path``; the domain stops."""
        await self._call(lambda: self._domain(name).save(path))

    async def restore(self, path: str) -> None:
        """``virDomainRestore``: the domain saved in ``path`` runs again where it was."""
        await self._call(lambda: self._conn().restore(path))

    async def abort_job(self, name: str) -> bool:
        """Abort the domain's job (a migration another connection started) and wait it out."""

        def work() -> bool:
            domain = self._domain(name)
            if domain.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return False
            with contextlib.suppress(libvirt.libvirtError):  # it may have ended meanwhile
                domain.abortJob()
            deadline = time.monotonic() + JOB_PATIENCE
            while domain.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                if time.monotonic() > deadline:
                    raise RucherError(ErrorCode.TIMEOUT, f"libvirt: the job of {name} goes on")
                time.sleep(0.1)
            return True

        return await self._call(work)

    async def migrated_away(self, name: str) -> bool:
        """Whether libvirt says the domain shut off because it migrated."""

        def work() -> bool:
            domain = self._lookup(name)
            if domain is None:
                return False
            state, reason = domain.state()
            return bool(
                state == libvirt.VIR_DOMAIN_SHUTOFF
                and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED
            )

        return await self._call(work)

    async def migrate(self, name: str, target: MigrationTarget) -> None:
        """Live-migrate peer to peer: this libvirtd drives the target's over ``peer_uri``.

        QEMU streams straight to ``migrate_uri`` (or through the libvirtd connection when
        ``tunnelled``). libvirt aborts a failed migration on both sides: the domain runs on.
        """

        def work() -> None:
            domain = self._domain(name)
            params: dict[str, Any] = {
                libvirt.VIR_MIGRATE_PARAM_DEST_XML: target.domain_xml,
                libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: target.domain_xml,
            }
            flags = (
                libvirt.VIR_MIGRATE_LIVE
                | libvirt.VIR_MIGRATE_PEER2PEER
                | libvirt.VIR_MIGRATE_PERSIST_DEST
            )
            if target.tunnelled:
                flags |= libvirt.VIR_MIGRATE_TUNNELLED
            else:
                params[libvirt.VIR_MIGRATE_PARAM_URI] = target.migrate_uri
            if target.bandwidth_kib:
                params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = -(-target.bandwidth_kib // 1024)
            if target.copy_sources:
                # QEMU mirrors these disks into the target's (pre-allocated) twins over NBD.
                flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
                params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = _copied_devices(
                    domain.XMLDesc(0), target.copy_sources
                )
            domain.migrateToURI3(target.peer_uri, params, flags)

        await self._call(work)


def _copied_devices(xml: str, sources: tuple[str, ...]) -> list[str]:
    """The target devices (``sda``) of the domain's disks whose sources are ``sources``."""
    devices = []
    for source in sources:
        device = _disk_target(xml, source)
        if device is None:
            raise RucherError(ErrorCode.INVALID, f"no disk of the domain uses '{source}'")
        devices.append(device)
    return devices


def _secret_xml(usage: str) -> str:
    """A persistent, private libvirt secret of usage type ``ceph`` named ``usage``."""
    secret = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(ET.SubElement(secret, "usage", type="ceph"), "name").text = usage
    return ET.tostring(secret, encoding="unicode")


def _disk_target(xml: str, source: str) -> str | None:
    """The target device (``sda``) of the domain disk whose source file, device or name is it."""
    for disk in ET.fromstring(xml).iter("disk"):  # noqa: S314 - libvirt's own XML
        found = disk.find("source")
        target = disk.find("target")
        if found is None or target is None:
            continue
        if source in {found.get("file"), found.get("dev"), found.get("name")}:
            return target.get("dev")
    return None


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""
