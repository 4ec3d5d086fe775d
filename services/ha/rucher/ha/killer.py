"""Killing this node's HA guests without the bus: libvirt first, then SIGKILL from ``/proc``.

The watchdog calls :func:`kill_ha_guests` when its lease is about to run out. It destroys the
libvirt domains of HA resources (``virDomainDestroy``), bounded by a timeout so a hung libvirtd
cannot make it miss the deadline, then kills any QEMU process of an HA guest still found in this
node's network namespace, and checks that none is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt  # type: ignore[import-untyped]
import structlog

from rucher import qemuproc

log = structlog.get_logger("rucher.ha.killer")

# The libvirt name of guest VMID is DOMAIN_PREFIX + VMID (the compute agent names them so).
DOMAIN_PREFIX = "rucher-"
GONE_PATIENCE = 2.0
# libvirt calls get threads of their own: a hung libvirtd then blocks only these, never the
# default pool the /proc kill runs in.
LIBVIRT_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ha-libvirt")


def vmid_of(name: str, prefix: str = DOMAIN_PREFIX) -> int | None:
    """The VMID a domain (or QEMU ``-name``) stands for, or None when Rucher did not name it."""
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def destroy_domains(uri: str, vmids: frozenset[int]) -> list[int]:
    """Blocking: destroy the running libvirt domains of ``vmids``; returns the VMIDs destroyed."""
    destroyed: list[int] = []
    conn: Any = libvirt.open(uri)
    try:
        for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            vmid = vmid_of(domain.name())
            if vmid is None or vmid not in vmids:
                continue
            try:
                domain.destroy()
                destroyed.append(vmid)
            except libvirt.libvirtError as err:
                if domain.isActive():
                    log.warning("destroy_failed", vmid=vmid, error=str(err))
    finally:
        conn.close()
    return destroyed


def local_ha_processes(
    vmids: Iterable[int], netns: int | None, proc: Any = qemuproc.PROC
) -> list[qemuproc.QemuProcess]:
    """QEMU processes of ``vmids`` running in network namespace ``netns`` (this node)."""
    wanted = frozenset(vmids)
    return [
        found
        for found in qemuproc.scan(proc)
        if found.netns == netns and vmid_of(found.guest) in wanted
    ]


def sigkill_ha_processes(vmids: Iterable[int], netns: int | None) -> list[int]:
    """SIGKILL every QEMU process of ``vmids`` in ``netns``; returns the VMIDs signalled."""
    killed: list[int] = []
    for found in local_ha_processes(vmids, netns):
        try:
            os.kill(found.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        vmid = vmid_of(found.guest)
        if vmid is not None:
            killed.append(vmid)
    return killed


def wait_gone(vmids: Iterable[int], netns: int | None, patience: float = GONE_PATIENCE) -> bool:
    """Blocking: wait until no QEMU process of ``vmids`` is left in ``netns``."""
    deadline = time.monotonic() + patience
    while local_ha_processes(vmids, netns):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


async def kill_ha_guests(
    vmids: frozenset[int], *, uri: str | None, destroy_timeout: float
) -> tuple[list[int], bool]:
    """Kill this node's HA guests now; returns the VMIDs killed and whether none is left."""
    netns = qemuproc.own_netns()
    killed: set[int] = set()
    if uri and vmids:
        try:
            async with asyncio.timeout(destroy_timeout):
                loop = asyncio.get_running_loop()
                killed.update(
                    await loop.run_in_executor(LIBVIRT_THREADS, destroy_domains, uri, vmids)
                )
        except TimeoutError:
            log.warning("destroy_timed_out", uri=uri, timeout=destroy_timeout)
        except libvirt.libvirtError as err:
            # libvirtd down or unreachable: the /proc path below still kills the guests.
            log.warning("destroy_unavailable", uri=uri, error=str(err))
    killed.update(await asyncio.to_thread(sigkill_ha_processes, vmids, netns))
    clean = await asyncio.to_thread(wait_gone, vmids, netns)
    return sorted(killed), clean
