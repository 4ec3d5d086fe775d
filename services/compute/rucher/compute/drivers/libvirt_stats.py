"""Counters of every running domain in one libvirt call (``getAllDomainStats``), off the loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import libvirt  # type: ignore[import-untyped]

from rucher.bus import RucherError
from rucher.compute.rrd import DomainStats
from rucher.proto.errors import ErrorCode

STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


def _sum(record: dict[str, Any], prefix: str, count_key: str, suffix: str) -> int:
    return sum(int(record.get(f"{prefix}.{index}.{suffix}", 0)) for index in
               range(int(record.get(count_key, 0))))  # fmt: skip


def domain_stats(name: str, record: dict[str, Any]) -> DomainStats:
    """One ``getAllDomainStats`` record as :class:`DomainStats` (memory in bytes)."""
    current = int(record.get("balloon.current", 0)) * 1024
    rss = int(record.get("balloon.rss", 0)) * 1024
    maximum = int(record.get("balloon.maximum", 0)) * 1024
    return DomainStats(
        name=name,
        cpu_time_ns=int(record.get("cpu.time", 0)),
        vcpus=int(record.get("vcpu.current", 1)),
        # Without a balloon driver in the guest, QEMU's resident size is the best measure.
        memory=min(rss, current) if rss and current else (rss or current),
        max_memory=maximum,
        max_disk=_sum(record, "block", "block.count", "capacity"),
        disk_read=_sum(record, "block", "block.count", "rd.bytes"),
        disk_write=_sum(record, "block", "block.count", "wr.bytes"),
        net_in=_sum(record, "net", "net.count", "rx.bytes"),
        net_out=_sum(record, "net", "net.count", "tx.bytes"),
    )


class LibvirtStats:
    """Counters of one libvirtd's running domains, on a connection of its own."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._connection: Any = None
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        with self._lock:
            if self._connection is None or not self._connection.isAlive():
                self._connection = libvirt.open(self.uri)
            return self._connection

    async def _call(self, work: Any) -> Any:
        try:
            return await asyncio.to_thread(work)
        except libvirt.libvirtError as err:
            raise RucherError(ErrorCode.INTERNAL, f"libvirt: {err.get_error_message()}") from err

    async def stats(self) -> list[DomainStats]:
        """The running domains' counters."""

        def work() -> list[DomainStats]:
            found = self._conn().getAllDomainStats(
                STATS, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            )
            return [domain_stats(domain.name(), record) for domain, record in found]

        result: list[DomainStats] = await self._call(work)
        return result

    async def defined(self) -> list[str]:
        """The names of every domain, running or not."""
        result: list[str] = await self._call(
            lambda: [domain.name() for domain in self._conn().listAllDomains()]
        )
        return result
