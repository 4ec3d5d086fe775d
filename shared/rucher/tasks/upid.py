"""Proxmox unique process ids (UPIDs): ``UPID:node:pid:pstart:starttime:type:id:user:``."""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass

_UPID = re.compile(
    r"^UPID:(?P<node>[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?):(?P<pid>[0-9A-Fa-f]{8}):"
    r"(?P<pstart>[0-9A-Fa-f]{8,9}):(?P<starttime>[0-9A-Fa-f]{8}):(?P<type>[^:\s]+):"
    r"(?P<id>[^:\s]*):(?P<user>[^:\s]+):$"
)


@dataclass(frozen=True)
class Upid:
    """The parts of a UPID, as Proxmox formats and parses them."""

    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str

    def __str__(self) -> str:
        return (
            f"UPID:{self.node}:{self.pid:08X}:{self.pstart:08X}:{self.starttime:08X}:"
            f"{self.type}:{self.id}:{self.user}:"
        )

    @classmethod
    def parse(cls, text: str) -> Upid:
        """Parse a UPID; raises ValueError naming the problem when it is not one."""
        match = _UPID.match(text)
        if not match:
            raise ValueError(f"unable to parse worker upid {text!r}")
        return cls(
            node=match["node"],
            pid=int(match["pid"], 16),
            pstart=int(match["pstart"], 16),
            starttime=int(match["starttime"], 16),
            type=match["type"],
            id=match["id"],
            user=match["user"],
        )


def _process_start_ticks() -> int:
    """This process's start time in clock ticks since boot, as Proxmox's ``pstart``."""
    try:
        with open(f"/proc/{os.getpid()}/stat", encoding="ascii") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return int(time.monotonic() * 100)


class UpidMinter:
    """Mints UPIDs for one worker process.

    Proxmox forks one process per task, so pid and pstart alone make UPIDs unique. Rucher runs
    many tasks in one process, so ``pstart`` is the process start in ticks plus a per-process
    sequence number: UPIDs stay unique for any number of tasks per second, keep Proxmox's shape
    and still sort by start. The task store's create-if-absent catches any remaining clash.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.pid = os.getpid()
        self._pstart = itertools.count(_process_start_ticks())

    def mint(self, task_type: str, task_id: str, user: str) -> Upid:
        """A new UPID for a task of ``task_type`` on ``task_id`` requested by ``user``."""
        for name, value in (("type", task_type), ("id", task_id), ("user", user)):
            if ":" in value or any(ch.isspace() for ch in value):
                raise ValueError(f"task {name} {value!r} may not hold ':' or whitespace")
        return Upid(
            node=self.node,
            pid=self.pid,
            pstart=next(self._pstart),
            starttime=int(time.time()),
            type=task_type,
            id=task_id,
            user=user,
        )
