"""``/storage`` and ``/nodes/{node}/storage``: definitions, status and volumes.

Definitions are cluster-wide (any storage service instance answers); status and content go to
the storage service of the node in the path. The schema has checked the parameters and the
permission clause; the handlers add Proxmox's per-storage and per-volume rules
(``check_volume_access``) and turn Proxmox's flat options into the typed definition.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from rucher.bus import RucherError
from rucher.bus.client import new_id
from rucher.gateway.multipart import FileUpload, MultipartError
from rucher.gateway.permissions import forbidden
from rucher.gateway.routing import Call, RouteTable
from rucher.gateway.uploads import ObjectUpload, delete_object
from rucher.proto import storage
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    ContentType,
    StorageDefinition,
    StorageDefinitionEntry,
    StorageStatus,
    StorageType,
    VolumeInfo,
)
from rucher.pve.params import ParamError
from rucher.pve.values import split_list

ROUTES = RouteTable()

AUDIT = ("Datastore.Audit", "Datastore.AllocateSpace")
KIB = 1024
# Proxmox options Rucher keeps in a definition, by their StorageDefinition field.
OPTIONS = {
    "content": "content",
    "nodes": "nodes",
    "shared": "shared",
    "disable": "disable",
    "path": "path",
    "pool": "pool",
    "monhost": "monhost",
    "username": "username",
}
LISTS = frozenset({"content", "nodes", "monhost"})
# Options that only steer how Proxmox prepares a directory: Rucher's dir driver makes its own.
IGNORED = frozenset({"mkdir", "create-base-path", "create-subdirs"})
# What a definition holds by default per type (Proxmox's plugin defaults).
DEFAULT_CONTENT = {
    StorageType.DIR: (ContentType.IMAGES, ContentType.ROOTDIR),
    StorageType.RBD: (ContentType.IMAGES,),
}
_AT_FIELD = re.compile(r"at `\$\.(\w+)")
_SIZE = re.compile(r"^(\d+)([MG]?)$")
# What ``POST .../upload`` stores (Proxmox's ``import`` content is not a Rucher content type).
FILE_UPLOADS = frozenset({ContentType.ISO.value, ContentType.VZTMPL.value})


def _flag(value: bool) -> int:
    return 1 if value else 0


# Definitions ---------------------------------------------------------------------------------


def _config(entry: StorageDefinitionEntry) -> dict[str, Any]:
    """A definition as ``storage.cfg`` lists it (``GET /storage``)."""
    d = entry.definition
    config: dict[str, Any] = {
        "storage": d.storage,
        "type": d.storage_type.value,
        "content": ",".join(c.value for c in d.content),
        "digest": entry.digest,
    }
    if d.nodes:
        config["nodes"] = ",".join(d.nodes)
    if d.shared:
        config["shared"] = 1
    if d.disable:
        config["disable"] = 1
    for name in ("path", "pool", "username"):
        if getattr(d, name) is not None:
            config[name] = getattr(d, name)
    if d.monhost:
        config["monhost"] = " ".join(d.monhost)
    return config


def _option_values(call: Call, *, skip: frozenset[str]) -> dict[str, Any]:
    """The definition fields the request sets; options Rucher does not keep are a 400."""
    fields: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for name, value in call.params.values.items():
        if name in skip or name in IGNORED or value is None:
            continue
        field = OPTIONS.get(name)
        if field is None:
            refused[name] = "option not supported by Rucher's storage backends"
            continue
        fields[field] = split_list(value) if name in LISTS else value
    if refused:
        raise ParamError(refused)
    return fields


def _definition(fields: dict[str, Any]) -> StorageDefinition:
    """The typed definition; a value the contract refuses is a 400 naming its parameter."""
    try:
        return msgspec.convert(fields, StorageDefinition)
    except msgspec.ValidationError as err:
        found = _AT_FIELD.search(str(err))
        name = found[1] if found else "storage"
        raise ParamError({"type" if name == "storage_type" else name: str(err)}) from err


def _storage_type(value: str) -> StorageType:
    try:
        return StorageType(value)
    except ValueError:
        supported = ", ".join(t.value for t in StorageType)
        raise ParamError(
            {"type": f"storage type '{value}' is not supported (Rucher has {supported})"}
        ) from None


async def _entries(
    call: Call, name: str | None = None, kind: StorageType | None = None
) -> tuple[StorageDefinitionEntry, ...]:
    query = storage.StorageDefinitionListQuery(storage=name, storage_type=kind)
    listing = await call.ask(storage.DEFINITION_LIST.address, query)
    return listing.definitions


@ROUTES("GET", "/storage")
async def list_storages(call: Call) -> list[dict[str, Any]]:
    """Definitions the caller may audit or allocate space on, optionally of one type."""
    kind = call.params["type"]
    if kind is not None and kind not in set(StorageType):
        return []
    entries = await _entries(call, kind=StorageType(kind) if kind else None)
    return [
        _config(entry)
        for entry in sorted(entries, key=lambda e: e.definition.storage)
        if call.allowed(f"/storage/{entry.definition.storage}", AUDIT, any_=True)
    ]


@ROUTES("POST", "/storage")
async def create_storage(call: Call) -> dict[str, Any]:
    """Add a ``dir`` or ``rbd`` storage definition."""
    p = call.params
    kind = _storage_type(p["type"])
    fields = _option_values(call, skip=frozenset({"storage", "type", "keyring"}))
    fields.setdefault("content", DEFAULT_CONTENT[kind])
    definition = _definition({**fields, "storage": p["storage"], "storage_type": kind})
    command = call.command(
        storage.StorageDefinitionCreate,
        definition=definition,
        user=call.authid,
        keyring=p["keyring"],
    )
    await call.ask(storage.DEFINITION_CREATE.address, command)
    return {"storage": definition.storage, "type": kind.value}


@ROUTES("GET", "/storage/{storage}")
async def read_storage(call: Call) -> dict[str, Any]:
    """One definition with its digest."""
    (entry,) = await _entries(call, call.params["storage"])
    return _config(entry)


@ROUTES("PUT", "/storage/{storage}")
async def update_storage(call: Call) -> dict[str, Any]:
    """Change options of a definition (``delete`` resets them), guarded by its digest."""
    p = call.params
    (entry,) = await _entries(call, p["storage"])
    current = entry.definition
    if p["digest"] is not None and p["digest"] != entry.digest:
        raise RucherError(
            ErrorCode.CONFLICT,
            "detected modified configuration - file changed by other user? Try again.",
            details={"field": "digest"},
        )
    fields = msgspec.to_builtins(current)
    deleted = split_list(p["delete"] or "")
    unknown = [name for name in deleted if name not in OPTIONS or name == "content"]
    if unknown:
        raise ParamError({"delete": f"cannot delete option '{unknown[0]}'"})
    blank = StorageDefinition(
        storage=current.storage, storage_type=current.storage_type, content=()
    )
    for name in deleted:
        fields[OPTIONS[name]] = msgspec.to_builtins(getattr(blank, OPTIONS[name]))
    changed = _option_values(
        call, skip=frozenset({"storage", "digest", "delete", "keyring"}) | set(deleted)
    )
    definition = _definition({**fields, **changed})
    command = call.command(
        storage.StorageDefinitionUpdate,
        definition=definition,
        digest=entry.digest,
        user=call.authid,
        keyring=p["keyring"],
    )
    await call.ask(storage.DEFINITION_UPDATE.address, command)
    return {"storage": current.storage, "type": current.storage_type.value}


@ROUTES("DELETE", "/storage/{storage}")
async def delete_storage(call: Call) -> None:
    """Remove a definition; its volumes stay where they are."""
    command = call.command(
        storage.StorageDefinitionDelete, storage=call.params["storage"], user=call.authid
    )
    await call.ask(storage.DEFINITION_DELETE.address, command)


# Status ----------------------------------------------------------------------------------


def _status(status: StorageStatus) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "storage": status.storage,
        "type": status.storage_type.value,
        "content": ",".join(c.value for c in status.content),
        "shared": _flag(status.shared),
        "active": _flag(status.active),
        "enabled": _flag(status.enabled),
    }
    if status.active:
        entry.update(total=status.total, used=status.used, avail=status.avail)
        if status.total:
            entry["used_fraction"] = status.used / status.total
    return entry


async def _statuses(call: Call, name: str | None = None) -> tuple[StorageStatus, ...]:
    query = storage.StorageStatusQuery(storage=name, enabled_only=bool(call.params["enabled"]))
    report = await call.ask(storage.STATUS.to(node=call.params["node"]), query)
    return report.storages


@ROUTES("GET", "/nodes/{node}/storage")
async def node_storages(call: Call) -> list[dict[str, Any]]:
    """The storages the node sees that the caller may audit, filtered by content."""
    wanted = set(split_list(call.params["content"] or ""))
    return [
        _status(status)
        for status in await _statuses(call, call.params["storage"])
        if call.allowed(f"/storage/{status.storage}", AUDIT, any_=True)
        and (not wanted or wanted & {c.value for c in status.content})
    ]


@ROUTES("GET", "/nodes/{node}/storage/{storage}/status")
async def storage_status(call: Call) -> dict[str, Any]:
    """One storage as the node sees it."""
    name = call.params["storage"]
    statuses = await _statuses(call, name)
    if not statuses:
        raise RucherError(
            ErrorCode.NOT_FOUND,
            f"storage '{name}' is not available on node '{call.params['node']}'",
            details={"field": "storage"},
        )
    return _status(statuses[0])


# Content ---------------------------------------------------------------------------------


def _volume(info: VolumeInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "volid": info.volid,
        "content": info.content.value,
        "format": info.format,
        "size": info.size,
    }
    if info.used is not None:
        entry["used"] = info.used
    if info.vmid is not None:
        entry["vmid"] = info.vmid
    if info.parent is not None:
        entry["parent"] = info.parent
    if info.ctime is not None:
        entry["ctime"] = info.ctime
    if info.notes:
        entry["notes"] = info.notes
    if info.path is not None:
        entry["path"] = info.path
    entry["protected"] = _flag(info.protected)
    return entry


def may_read_volume(call: Call, info: VolumeInfo) -> bool:
    """Proxmox's check_volume_access for a caller who is not the volume's guest."""
    sid = info.volid.partition(":")[0]
    if call.allowed(f"/storage/{sid}", ["Datastore.Allocate"]):
        return True
    if info.content in {ContentType.ISO, ContentType.VZTMPL}:
        return call.allowed(f"/storage/{sid}", AUDIT, any_=True)
    if info.content is ContentType.BACKUP and info.vmid is not None:
        return call.allowed(f"/storage/{sid}", ["Datastore.AllocateSpace"]) and call.allowed(
            f"/vms/{info.vmid}", ["VM.Backup"]
        )
    if info.content in {ContentType.IMAGES, ContentType.ROOTDIR} and info.vmid is not None:
        return call.allowed(f"/storage/{sid}", ["Datastore.Audit"]) and call.allowed(
            f"/vms/{info.vmid}", ["VM.Config.Disk"]
        )
    return False


def _volid(call: Call) -> str:
    """The volume in the path as ``STORAGE:VOLNAME`` (a bare name takes the path's storage)."""
    name, volume = call.params["storage"], call.params["volume"]
    if ":" not in volume:
        if not name:
            raise ParamError({"volume": "no storage specified"})
        return f"{name}:{volume}"
    sid = volume.partition(":")[0]
    if name and sid != name:
        raise ParamError({"volume": f"storage ID mismatch ({sid} != {name})"})
    return str(volume)


def _as_volume(err: RucherError) -> RucherError:
    """A storage error naming ``volid`` names the path's ``volume`` instead."""
    if err.details.get("field") == "volid":
        return RucherError(err.code, err.message, details={**err.details, "field": "volume"})
    return err


async def _info(call: Call) -> VolumeInfo:
    query = storage.VolumeInfoQuery(volid=_volid(call))
    try:
        reply = await call.ask(storage.VOLUME_INFO.to(node=call.params["node"]), query)
    except RucherError as err:
        raise _as_volume(err) from err
    return reply.volume


@ROUTES("GET", "/nodes/{node}/storage/{storage}/content")
async def list_content(call: Call) -> list[dict[str, Any]]:
    """A storage's volumes the caller may read, filtered by content type and owner."""
    p = call.params
    content = ContentType(p["content"]) if p["content"] in set(ContentType) else None
    if p["content"] is not None and content is None:
        return []  # a content type Rucher never stores (import): nothing of it exists
    query = storage.ContentListQuery(storage=p["storage"], content=content, vmid=p["vmid"])
    listing = await call.ask(storage.CONTENT_LIST.to(node=p["node"]), query)
    return [_volume(info) for info in listing.volumes if may_read_volume(call, info)]


def _bytes(size: str) -> int:
    """Proxmox's allocation size: KiB, or MiB/GiB with ``M``/``G``."""
    found = _SIZE.match(size)
    if found is None:
        raise ParamError({"size": f"unable to parse size '{size}'"})
    return int(found[1]) * KIB * {"": 1, "M": KIB, "G": KIB * KIB}[found[2]]


@ROUTES("POST", "/nodes/{node}/storage/{storage}/content")
async def allocate_volume(call: Call) -> str:
    """Allocate a disk volume for ``vmid``; answers its volume id."""
    p = call.params
    command = call.command(
        storage.VolumeAllocate,
        storage=p["storage"],
        vmid=p["vmid"],
        size=_bytes(p["size"]),
        filename=p["filename"],
        format=p["format"],
    )
    details = await call.ask(storage.VOLUME_ALLOCATE.to(node=p["node"]), command)
    return details.volume.volid


@ROUTES("GET", "/nodes/{node}/storage/{storage}/content/{volume}")
async def read_volume(call: Call) -> dict[str, Any]:
    """One volume's attributes and its path on the node, as ``pvesm path`` prints it."""
    info = await _info(call)
    if not may_read_volume(call, info):
        raise forbidden(f"Permission check failed (volume {info.volid})")
    entry = _volume(info)
    entry.pop("volid")
    entry.setdefault("notes", "")
    return entry


@ROUTES("PUT", "/nodes/{node}/storage/{storage}/content/{volume}")
async def update_volume(call: Call) -> None:
    """Change a volume's notes or protection."""
    info = await _info(call)
    if not may_read_volume(call, info):
        raise forbidden(f"Permission check failed (volume {info.volid})")
    p = call.params
    command = call.command(
        storage.VolumeUpdate, volid=info.volid, notes=p["notes"], protected=p["protected"]
    )
    try:
        await call.ask(storage.VOLUME_UPDATE.to(node=p["node"]), command)
    except RucherError as err:
        raise _as_volume(err) from err


@ROUTES("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}")
async def delete_volume(call: Call) -> None:
    """Delete a volume no guest owns (Datastore.Allocate; a backup: AllocateSpace, VM.Backup)."""
    info = await _info(call)
    sid = info.volid.partition(":")[0]
    if info.content is ContentType.BACKUP and info.vmid is not None:
        allowed = call.allowed(f"/storage/{sid}", ["Datastore.AllocateSpace"]) and call.allowed(
            f"/vms/{info.vmid}", ["VM.Backup"]
        )
    else:
        allowed = call.allowed(f"/storage/{sid}", ["Datastore.Allocate"])
    if not allowed:
        raise forbidden(f"Permission check failed (/storage/{sid}, Datastore.Allocate)")
    command = call.command(storage.VolumeFree, volid=info.volid, check_owner=True)
    try:
        await call.ask(storage.VOLUME_FREE.to(node=call.params["node"]), command)
    except RucherError as err:
        raise _as_volume(err) from err


@ROUTES("POST", "/nodes/{node}/storage/{storage}/download-url")
async def download_url(call: Call) -> str:
    """Download an ISO or template into the storage, as a task; answers its UPID."""
    p = call.params
    if p["compression"] is not None:
        raise ParamError({"compression": "decompressing downloads is not supported"})
    command = call.command(
        storage.ContentDownload,
        user=call.authid,
        storage=p["storage"],
        url=p["url"],
        filename=p["filename"],
        content=p["content"],
        checksum=p["checksum"],
        checksum_algorithm=p["checksum-algorithm"],
        verify_certificates=p["verify-certificates"],
    )
    reply = await call.ask(storage.CONTENT_DOWNLOAD.to(node=p["node"]), command)
    return reply.upid


@ROUTES("POST", "/nodes/{node}/storage/{storage}/upload", file_param="filename")
async def upload(call: Call) -> str:
    """Store an uploaded ISO or template, as a task; answers its UPID.

    The file streams from the HTTP body into the ``uploads`` object store; the node's storage
    service then moves it into the storage, checks its digests and deletes the object. A body
    cut off or refused leaves no object behind, and nothing reaches the storage.
    """
    p = call.params
    file: FileUpload | None = getattr(call.request.state, "upload", None)
    if file is None:
        raise ParamError(
            {"filename": "no file: send it as the multipart/form-data part 'filename'"}
        )
    if p["content"] not in FILE_UPLOADS:
        raise ParamError({"content": f"uploading content type '{p['content']}' is not supported"})
    node = p["node"]
    # ``tmpfilename`` is Proxmox's internal hand-over from its proxy: the bytes come from the body.
    command = call.command(
        storage.ContentUpload,
        user=call.authid,
        storage=p["storage"],
        object=f"{node}.{new_id()}",
        filename=p["filename"],
        content=p["content"],
        checksum=p["checksum"],
        checksum_algorithm=p["checksum-algorithm"],
    )
    await _receive(call, file, command.object)
    try:
        reply = await call.ask(storage.CONTENT_UPLOAD.to(node=node), command)
    except BaseException:
        await delete_object(call.gateway.bus.js, command.object)
        raise
    return reply.upid


async def _receive(call: Call, file: FileUpload, name: str) -> None:
    """Stream the file into the object ``name``; nothing is left behind when that fails."""
    target = ObjectUpload(call.gateway.bus.js, name)
    try:
        await target.write(file.chunks())
        trailing = await file.reader.finish()
    except MultipartError as err:
        await target.abort()
        raise RucherError(
            ErrorCode.INVALID, f"upload failed: {err}", details={"field": "filename"}
        ) from err
    except BaseException:
        await target.abort()
        raise
    if trailing:
        await target.abort()
        raise ParamError({trailing[0]: "form fields must come before the file"})
    try:
        await target.commit()
    except BaseException:
        await target.abort()
        raise
