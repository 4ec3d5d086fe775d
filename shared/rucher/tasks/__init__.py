"""Proxmox-style tasks: UPIDs, state and logs in JetStream, a runner and a reaper."""

from rucher.tasks.reaper import TaskReaper
from rucher.tasks.runner import TaskContext, TaskRunner
from rucher.tasks.store import INTERRUPTED, TaskStore
from rucher.tasks.upid import Upid, UpidMinter

__all__ = [
    "INTERRUPTED",
    "TaskContext",
    "TaskReaper",
    "TaskRunner",
    "TaskStore",
    "Upid",
    "UpidMinter",
]
