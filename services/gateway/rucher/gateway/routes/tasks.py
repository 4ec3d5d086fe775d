"""Tasks: lists, status, log and stop of the asynchronous operations answered with a UPID.

Lists come from the read model; a task's status and log are read from the store directly, so a
client polling right after it got its UPID already finds the task. Callers see their own tasks;
``Sys.Audit`` on ``/nodes/{node}`` shows every task of the node (``Sys.Modify`` to stop them).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from rucher.bus import RucherError
from rucher.gateway import present
from rucher.gateway.permissions import forbidden
from rucher.gateway.routing import Call, RouteTable
from rucher.proto.errors import ErrorCode
from rucher.proto.task import TaskState, TaskStatus
from rucher.pve.values import split_list
from rucher.tasks import Upid

ROUTES = RouteTable()

# /cluster/tasks has no limit parameter: like Proxmox's cluster task log it shows the newest.
CLUSTER_TASKS = 1000
_WARNINGS = re.compile(r"^WARNINGS: \d+$")


def status_type(task: TaskState) -> str:
    """Proxmox's task status class: ok, warning, error, or unknown while it runs."""
    status = task.exitstatus if task.status is TaskStatus.STOPPED else None
    if not status or status == "unknown":
        return "unknown"
    if status == "OK":
        return "ok"
    return "warning" if _WARNINGS.match(status) else "error"


def _newest_first(tasks: list[TaskState]) -> list[TaskState]:
    return sorted(tasks, key=lambda task: (task.starttime, task.pstart), reverse=True)


def _owned_or(call: Call, task: TaskState, privilege: str) -> None:
    if task.user != call.authid and not call.allowed(f"/nodes/{task.node}", [privilege]):
        raise forbidden(f"Permission check failed (/nodes/{task.node}, {privilege})")


async def _task(call: Call) -> TaskState:
    upid, node = call.params["upid"], call.params["node"]
    try:
        parsed = Upid.parse(upid)
    except ValueError as err:
        raise RucherError(
            ErrorCode.INVALID, "unable to parse worker upid", details={"field": "upid"}
        ) from err
    if parsed.node != node:
        raise RucherError(ErrorCode.NOT_FOUND, f"no such task {upid} on node {node}")
    return await call.gateway.tasks.get(upid)


@ROUTES("GET", "/nodes/{node}/tasks")
async def node_tasks(call: Call) -> list[dict[str, Any]]:
    """A node's tasks, newest first, with Proxmox's filters and paging."""
    p = call.params
    node = p["node"]
    auditor = call.allowed(f"/nodes/{node}", ["Sys.Audit"])
    source = p["source"]
    wanted_status = set(split_list(p["statusfilter"] or ""))
    userfilter = (p["userfilter"] or "").lower()

    def shown(task: TaskState) -> bool:
        running = task.status is TaskStatus.RUNNING
        return (
            (source == "all" or running == (source == "active"))
            and (auditor or task.user == call.authid)
            and userfilter in task.user.lower()
            and (p["typefilter"] is None or task.type == p["typefilter"])
            and (not p["errors"] or status_type(task) != "ok")
            and (p["vmid"] is None or task.id == str(p["vmid"]))
            and (p["since"] is None or task.starttime >= p["since"])
            and (p["until"] is None or task.starttime <= p["until"])
            and (not wanted_status or status_type(task) in wanted_status)
        )

    tasks = [task for task in call.gateway.model.tasks.values() if task.node == node]
    selected = [task for task in _newest_first(tasks) if shown(task)]
    start, limit = p["start"], p["limit"]
    return [present.task_entry(task) for task in selected[start : start + limit]]


@ROUTES("GET", "/cluster/tasks")
async def cluster_tasks(call: Call) -> list[dict[str, Any]]:
    """The newest tasks of the whole cluster: all with Sys.Audit on /, else the caller's own."""
    everything = call.allowed("/", ["Sys.Audit"])
    tasks = [
        task for task in call.gateway.model.tasks.values() if everything or task.user == call.authid
    ]
    return [present.task_entry(task) for task in _newest_first(tasks)[:CLUSTER_TASKS]]


@ROUTES("GET", "/nodes/{node}/tasks/{upid}")
async def task_index(call: Call) -> list[dict[str, str]]:
    """What there is to read about a task."""
    return [{"name": "log"}, {"name": "status"}]


@ROUTES("GET", "/nodes/{node}/tasks/{upid}/status")
async def task_status(call: Call) -> dict[str, Any]:
    """``running``, or ``stopped`` with ``exitstatus`` OK or the error."""
    task = await _task(call)
    _owned_or(call, task, "Sys.Audit")
    return present.task_status(task)


@ROUTES("GET", "/nodes/{node}/tasks/{upid}/log")
async def task_log(call: Call) -> list[dict[str, Any]] | Response:
    """Log lines ``[{n, t}]`` from ``start`` (0-based), at most ``limit``; or the whole text."""
    task = await _task(call)
    _owned_or(call, task, "Sys.Audit")
    store = call.gateway.tasks
    if call.params["download"]:
        lines = await store.read_log(task.upid, 0, 1 << 31)
        return Response(
            "".join(f"{line.t}\n" for line in lines),
            media_type="text/plain",
            headers={"Content-Disposition": f'attachment; filename="{task.upid}.log"'},
        )
    lines = await store.read_log(task.upid, call.params["start"], call.params["limit"])
    return [{"n": line.n, "t": line.t} for line in lines]


@ROUTES("DELETE", "/nodes/{node}/tasks/{upid}")
async def stop_task(call: Call) -> None:
    """Ask the task's worker to stop it; it ends ``interrupted by signal``."""
    task = await _task(call)
    _owned_or(call, task, "Sys.Modify")
    await call.gateway.tasks.request_cancel(task.upid, call.authid)
