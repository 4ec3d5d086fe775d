"""``/pools``: resource pools, kept by the IAM service; members described from the read model."""

from __future__ import annotations

from typing import Any

from rucher.bus import RucherError
from rucher.gateway import present
from rucher.gateway.permissions import can_modify_acl, forbidden
from rucher.gateway.routing import Call, RouteTable
from rucher.proto import iam
from rucher.proto.errors import ErrorCode
from rucher.proto.iam_state import PoolRecord
from rucher.pve.values import split_list

ROUTES = RouteTable()


def _members(call: Call, pool: PoolRecord, kind: str | None) -> list[dict[str, Any]]:
    model = call.gateway.model
    members: list[dict[str, Any]] = []
    for vmid in pool.vms:
        record = model.guests.get(vmid)
        if record is None or kind not in (None, record.type.value):
            continue
        capacity = model.capacity.get(record.node)
        members.append(
            present.guest_resource(
                record,
                model.guest_state.get(vmid),
                pool.poolid,
                capacity.cpus if capacity else 0,
            )
        )
    if kind in (None, "storage"):
        for node, statuses in sorted(model.storages.items()):
            members.extend(
                present.storage_resource(node, status)
                for status in statuses
                if status.storage in pool.storage
            )
    return members


async def _pools(call: Call) -> tuple[PoolRecord, ...]:
    return (await call.ask(iam.POOL_LIST.address, call.command(iam.PoolListQuery))).pools


@ROUTES("GET", "/pools")
async def list_pools(call: Call) -> list[dict[str, Any]]:
    """Pools on which the caller holds Pool.Audit; with ``poolid``, that one and its members."""
    wanted = call.params["poolid"]
    listed = []
    for pool in await _pools(call):
        if wanted is not None and pool.poolid != wanted:
            continue
        if not call.allowed(f"/pool/{pool.poolid}", ["Pool.Audit"]):
            continue
        entry: dict[str, Any] = {"poolid": pool.poolid, "comment": pool.comment}
        if wanted is not None:
            entry["members"] = _members(call, pool, call.params["type"])
        listed.append(entry)
    return listed


@ROUTES("GET", "/pools/{poolid}")
async def get_pool(call: Call) -> dict[str, Any]:
    """A pool's comment and members (guests, and storages on every node that has them)."""
    for pool in await _pools(call):
        if pool.poolid == call.params["poolid"]:
            return {
                "comment": pool.comment,
                "members": _members(call, pool, call.params["type"]),
            }
    raise RucherError(ErrorCode.NOT_FOUND, f"pool '{call.params['poolid']}' does not exist")


@ROUTES("POST", "/pools")
async def create_pool(call: Call) -> None:
    """Create a pool."""
    p = call.params
    request = call.command(
        iam.PoolCreate, actor=call.authid, poolid=p["poolid"], comment=p["comment"]
    )
    await call.change_iam(iam.POOL_CREATE.address, request)


@ROUTES("PUT", "/pools/{poolid}")
async def update_pool(call: Call) -> None:
    """Change the comment; add (or with ``delete``, remove) guests and storages.

    Moving an object into or out of a pool changes who may act on it, so the caller must be
    allowed to modify the permissions of each object named, as Proxmox requires.
    """
    p = call.params
    vms = tuple(int(vmid) for vmid in split_list(p["vms"] or ""))
    storages = tuple(split_list(p["storage"] or ""))
    paths = [f"/vms/{vmid}" for vmid in vms] + [f"/storage/{sid}" for sid in storages]
    index = call.gateway.view.index
    for path in paths:
        if not can_modify_acl(index, call.authid, path):
            raise forbidden(f"Permission check failed ({path}, Permissions.Modify)")
    request = call.command(
        iam.PoolUpdate,
        actor=call.authid,
        poolid=p["poolid"],
        comment=p["comment"],
        vms=vms,
        storage=storages,
        delete=p["delete"],
        allow_move=p["allow-move"],
    )
    await call.change_iam(iam.POOL_UPDATE.address, request)


@ROUTES("DELETE", "/pools/{poolid}")
async def delete_pool(call: Call) -> None:
    """Delete an empty pool."""
    request = call.command(iam.PoolDelete, actor=call.authid, poolid=call.params["poolid"])
    await call.change_iam(iam.POOL_DELETE.address, request)
