"""Proxmox volume names, storage definitions' checks, the Ceph settings and disk definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import (
    ContentType,
    StorageDefinition,
    StorageDefinitionCreate,
    StorageDefinitionDelete,
    StorageDefinitionListQuery,
    StorageDefinitionUpdate,
    StorageRecord,
    StorageType,
)
from rucher.service import SettingsError
from rucher.storage import volnames
from rucher.storage.config import read_ceph_conf
from rucher.storage.definitions import DEFAULT_LOCAL, Definitions, digest, normalized
from rucher.storage.disks import monitor_hosts, rbd_mapping
from rucher.storage.drivers.ceph import bare_key

from .test_storage_service import Events, MemoryBook

DIR, RBD = StorageType.DIR, StorageType.RBD


@pytest.mark.parametrize(
    ("kind", "volname", "content", "vmid", "fmt", "base"),
    [
        (DIR, "100/vm-100-disk-0.qcow2", ContentType.IMAGES, 100, "qcow2", None),
        (DIR, "100/base-100-disk-1.raw", ContentType.IMAGES, 100, "raw", None),
        (DIR, "100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2", ContentType.IMAGES, 101,
         "qcow2", "base-100-disk-0.qcow2"),
        (DIR, "105/subvol-105-disk-0", ContentType.ROOTDIR, 105, "subvol", None),
        (DIR, "iso/debian-12.iso", ContentType.ISO, None, "iso", None),
        (DIR, "vztmpl/alpine-3.19.tar.xz", ContentType.VZTMPL, None, "tar.xz", None),
        (DIR, "backup/vzdump-qemu-100-2024_01_01-00_00_00.vma.zst", ContentType.BACKUP, 100,
         "vma.zst", None),
        (RBD, "vm-100-disk-0", ContentType.IMAGES, 100, "raw", None),
        (RBD, "base-100-disk-0/vm-101-disk-3", ContentType.IMAGES, 101, "raw", "base-100-disk-0"),
    ],
)  # fmt: skip
def test_volume_names_parse_and_build_back(kind, volname, content, vmid, fmt, base):
    parsed = volnames.parse(kind, volname)

    assert (parsed.content, parsed.vmid, parsed.format, parsed.base) == (content, vmid, fmt, base)
    assert volnames.build(kind, parsed) == volname


@pytest.mark.parametrize(
    ("kind", "volname"),
    [
        (DIR, "100/vm-101-disk-0.qcow2"),  # folder and name disagree on the owner
        (DIR, "100/vm-100-disk-0"),  # no format extension
        (DIR, "100/vm-100-disk-0.qcow2/101/vm-101-disk-0.qcow2"),  # parent is no base
        (DIR, "iso/../../etc/passwd"),
        (DIR, "iso/debian.qcow2"),
        (DIR, "images/100"),
        (RBD, "vm-100-disk-0/vm-101-disk-0"),
        (RBD, "disk-0"),
    ],
)
def test_malformed_volume_names_are_invalid_naming_the_volid(kind, volname):
    with pytest.raises(RucherError) as caught:
        volnames.parse(kind, volname)

    assert caught.value.code is ErrorCode.INVALID and caught.value.details == {"field": "volid"}


def test_requested_names_follow_proxmox_rules():
    assert volnames.requested_name(DIR, 100, "vm-100-disk-3", "qcow2") == (
        "vm-100-disk-3.qcow2",
        "qcow2",
    )
    assert volnames.requested_name(DIR, 100, "vm-100-data.vmdk", None) == (
        "vm-100-data.vmdk",
        "vmdk",
    )
    assert volnames.requested_name(RBD, 100, "vm-100-disk-3", None) == ("vm-100-disk-3", "raw")
    for bad, field in [("base-100-disk-0", "filename"), ("vm-1000-disk-0", "filename")]:
        with pytest.raises(RucherError) as caught:
            volnames.requested_name(DIR, 100, bad, None)
        assert caught.value.details["field"] == field
    assert volnames.disk_name(DIR, 7, 2, "qcow2", base=True) == "base-7-disk-2.qcow2"


# Definitions ---------------------------------------------------------------------------------


def rbd(**fields) -> StorageDefinition:
    defaults = {
        "content": (ContentType.ROOTDIR, ContentType.IMAGES),
        "monhost": ("10.0.0.1", "10.0.0.2"),
    }
    return StorageDefinition(storage="ceph", storage_type=RBD, **{**defaults, **fields})


def test_an_rbd_definition_is_shared_with_proxmox_defaults_and_ordered_content():
    definition = normalized(rbd())

    assert definition.shared and definition.pool == "rbd" and definition.username == "admin"
    assert definition.content == (ContentType.IMAGES, ContentType.ROOTDIR)
    assert digest(definition) == digest(normalized(rbd()))
    assert digest(definition) != digest(normalized(rbd(pool="other")))


@pytest.mark.parametrize(
    ("definition", "field"),
    [
        (rbd(content=(ContentType.ISO,)), "content"),
        (rbd(monhost=()), "monhost"),
        (rbd(path="/srv"), "path"),
        (StorageDefinition(storage="d", storage_type=DIR, content=()), "path"),
        (StorageDefinition(storage="d", storage_type=DIR, content=(), path="srv"), "path"),
        (StorageDefinition(storage="d", storage_type=DIR, content=(), path="/s", pool="p"), "pool"),
        (StorageDefinition(storage="d", storage_type=DIR, content=(), path="/s", nodes=("a", "a")),
         "nodes"),
    ],
)  # fmt: skip
def test_bad_definitions_are_refused_naming_the_field(definition, field):
    with pytest.raises(RucherError) as caught:
        normalized(definition)

    assert caught.value.code is ErrorCode.INVALID and caught.value.details["field"] == field


def test_the_built_in_local_storage_may_use_each_node_s_own_folder():
    assert normalized(DEFAULT_LOCAL).path is None
    assert set(DEFAULT_LOCAL.content) == set(ContentType)


@pytest.fixture
def definitions() -> Definitions:
    return Definitions(MemoryBook(), Events(), "n1")


async def test_definitions_are_created_once_listed_with_digests_and_keep_secrets(definitions):
    create = StorageDefinitionCreate(
        command_id="1", definition=rbd(), keyring="[client.admin]\n\tkey = AQBs==\n"
    )
    await definitions.create(create)

    with pytest.raises(RucherError) as caught:
        await definitions.create(create)
    assert caught.value.code is ErrorCode.EXISTS and caught.value.details["field"] == "storage"
    assert definitions.book.records["ceph"].keyring == "AQBs=="
    listing = await definitions.list(StorageDefinitionListQuery())
    assert [e.definition.storage for e in listing.definitions] == ["ceph"]
    assert "AQBs" not in repr(listing)
    assert definitions.events.sent[0][0] == "evt.storage.definition_changed.n1"


async def test_an_update_with_a_stale_digest_or_a_new_type_is_refused(definitions):
    await definitions.create(StorageDefinitionCreate(command_id="1", definition=rbd()))
    seen = (
        (await definitions.list(StorageDefinitionListQuery(storage="ceph"))).definitions[0].digest
    )
    await definitions.update(
        StorageDefinitionUpdate(command_id="2", definition=rbd(pool="fast"), digest=seen)
    )

    for change, field, code in [
        (StorageDefinitionUpdate(command_id="3", definition=rbd(), digest=seen), "digest",
         ErrorCode.CONFLICT),
        (StorageDefinitionUpdate(command_id="4", definition=StorageDefinition(
            storage="ceph", storage_type=DIR, content=(), path="/srv")), "storage_type",
         ErrorCode.INVALID),
        (StorageDefinitionUpdate(command_id="5", definition=StorageDefinition(
            storage="ceph", storage_type=DIR, content=(), path="/s"), keyring="k"), "keyring",
         ErrorCode.INVALID),
    ]:  # fmt: skip
        with pytest.raises(RucherError) as caught:
            await definitions.update(change)
        assert (caught.value.code, caught.value.details["field"]) == (code, field)
    assert definitions.book.records["ceph"].definition.pool == "fast"


async def test_deleting_an_unknown_storage_is_not_found(definitions):
    with pytest.raises(RucherError) as caught:
        await definitions.delete(StorageDefinitionDelete(command_id="1", storage="nope"))
    assert caught.value.code is ErrorCode.NOT_FOUND


async def test_ensure_keeps_a_changed_local_but_follows_the_node_s_ceph(definitions):
    assert await definitions.ensure(DEFAULT_LOCAL)
    only_isos = StorageDefinition(storage="local", storage_type=DIR, content=(ContentType.ISO,))
    await definitions.book.replace("local", lambda _: StorageRecord(definition=only_isos))
    assert not await definitions.ensure(DEFAULT_LOCAL)
    assert definitions.book.records["local"].definition.content == (ContentType.ISO,)
    assert await definitions.ensure(rbd(), "k1", overwrite=True)
    assert not await definitions.ensure(rbd(), "k1", overwrite=True)
    assert await definitions.ensure(rbd(monhost=("10.9.9.9",)), "k2", overwrite=True)
    assert definitions.book.records["ceph"].keyring == "k2"


def test_a_keyring_file_or_a_bare_key_both_give_the_key():
    assert bare_key('[client.admin]\n\tkey = AQD+abc==\n\tcaps mon = "allow *"\n') == "AQD+abc=="
    assert bare_key(" AQD+abc== \n") == "AQD+abc=="


# Ceph settings and disk definitions ----------------------------------------------------------


def test_a_node_s_ceph_conf_becomes_an_rbd_definition(tmp_path: Path):
    keyring = tmp_path / "admin.keyring"
    keyring.write_text("[client.admin]\n\tkey = AQCsecret==\n")
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon host = [v2:127.0.0.1:3300]\n[client]\nkeyring = {keyring}\n")

    seed = read_ceph_conf(conf, "ceph", "rbd")

    assert seed.key == "AQCsecret=="
    assert seed.definition.monhost == ("[v2:127.0.0.1:3300]",)
    assert normalized(seed.definition).storage_type is RBD
    conf.write_text("[global]\nfsid = x\n")
    with pytest.raises(SettingsError, match="mon host"):
        read_ceph_conf(conf, "ceph", "rbd")


def test_monitor_addresses_in_every_notation():
    assert monitor_hosts(("10.0.0.1 10.0.0.2:6789", "[v2:10.0.0.3:3300,v1:10.0.0.3:6789]")) == [
        ("10.0.0.1", ""),
        ("10.0.0.2", "6789"),
        ("10.0.0.3", "3300"),
    ]


def test_an_rbd_disk_for_libvirt_names_pool_image_monitors_and_the_ceph_secret():
    mapping = rbd_mapping("ceph:vm-100-disk-0", normalized(rbd()), "vm-100-disk-0", "admin", "K")

    assert mapping.path == "rbd/vm-100-disk-0" and mapping.secret == "K"
    assert '<source protocol="rbd" name="rbd/vm-100-disk-0">' in mapping.libvirt_disk
    assert '<host name="10.0.0.2" />' in mapping.libvirt_disk
    assert '<secret type="ceph" usage="rucher-ceph-ceph" />' in mapping.libvirt_disk
