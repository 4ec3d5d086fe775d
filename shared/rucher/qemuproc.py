"""The QEMU processes running on this host, read straight from ``/proc`` (no libvirt, no bus).

Both the HA watchdog's last-resort kill and the test suite's split-brain checker need to know
which guests really run, even when libvirtd hangs or the node is cut off. A QEMU process names
its guest on its command line (``-name guest=rucher-100,...`` as libvirt writes it, or a bare
``-name rucher-100``) and its UUID (``-uuid ...``); the network namespace it lives in
(``/proc/PID/ns/net``) tells which node of a one-host multi-node harness it belongs to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class QemuProcess:
    """One running ``qemu-system-*`` process: which guest, and in which network namespace."""

    pid: int
    start_ticks: int
    guest: str
    uuid: str | None
    netns: int | None
    incoming: bool = False  # started as a live migration's target (``-incoming``)


def guest_name(argv: list[str]) -> str | None:
    """The guest name from a QEMU command line (``-name guest=X,...`` or ``-name X``)."""
    for index, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            value = argv[index + 1]
            for part in value.split(","):
                if part.startswith("guest="):
                    return part[len("guest=") :]
            first = value.split(",", 1)[0]
            return first if "=" not in first else None
    return None


def guest_uuid(argv: list[str]) -> str | None:
    """The ``-uuid`` value of a QEMU command line, if any."""
    for index, arg in enumerate(argv[:-1]):
        if arg in ("-uuid", "--uuid"):
            return argv[index + 1]
    return None


def netns_inode(pid: int, proc: Path = PROC) -> int | None:
    """The inode of ``pid``'s network namespace (None if the process is gone)."""
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


def start_ticks(pid: int, proc: Path = PROC) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in field 2 may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _argv(pid_dir: Path) -> list[str] | None:
    try:
        raw = (pid_dir / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None


def scan(proc: Path = PROC) -> Iterator[QemuProcess]:
    """Every ``qemu-system-*`` process that names its guest, as found now."""
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        argv = _argv(pid_dir)
        if argv is None or not os.path.basename(argv[0]).startswith("qemu-system-"):
            continue
        name = guest_name(argv)
        if name is None:
            continue
        pid = int(pid_dir.name)
        ticks = start_ticks(pid, proc)
        if ticks is None:
            continue
        yield QemuProcess(
            pid=pid,
            start_ticks=ticks,
            guest=name,
            uuid=guest_uuid(argv),
            netns=netns_inode(pid, proc),
            incoming="-incoming" in argv,
        )


def own_netns(proc: Path = PROC) -> int | None:
    """The inode of this process's own network namespace."""
    try:
        return os.stat(proc / "self" / "ns" / "net").st_ino
    except OSError:
        return None
