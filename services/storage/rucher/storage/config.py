"""The storage service's settings, read once from the environment."""

from __future__ import annotations

import configparser
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.proto.storage import ContentType, StorageDefinition, StorageType
from rucher.service import Settings, SettingsError, env_number


@dataclass(frozen=True)
class CephSeed:
    """A Ceph cluster this node is configured with, kept as an ``rbd`` storage definition."""

    definition: StorageDefinition
    key: str


@dataclass(frozen=True)
class StorageSettings:
    """What the storage service reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    local_path: Path
    staging: Path
    qemu_img: str
    status_interval: float
    transfer_timeout: float
    ceph: CephSeed | None

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> StorageSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        state = base.state_dir.resolve()
        conf = environ.get("RUCHER_CEPH_CONF", "")
        ceph = None
        if conf:
            storage = environ.get("RUCHER_CEPH_STORAGE", "ceph")
            ceph = read_ceph_conf(Path(conf), storage, environ.get("RUCHER_CEPH_POOL", "rbd"))
        return cls(
            base=base,
            local_path=Path(environ.get("RUCHER_STORAGE_LOCAL_PATH") or state / "local"),
            staging=state / "staging",
            qemu_img=environ.get("RUCHER_QEMU_IMG", "qemu-img"),
            status_interval=number("RUCHER_STORAGE_STATUS_INTERVAL", 30.0),
            transfer_timeout=number("RUCHER_STORAGE_TRANSFER_TIMEOUT", 30.0),
            ceph=ceph,
        )


def read_ceph_conf(path: Path, storage: str, pool: str) -> CephSeed:
    """The monitors and client.admin key of the cluster ``path`` (a ceph.conf) describes."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(path.read_text())
    except (OSError, configparser.Error) as err:
        raise SettingsError(f"RUCHER_CEPH_CONF={str(path)!r} cannot be read: {err}") from err

    def option(section: str, *names: str) -> str | None:
        for name in names:
            for variant in (name, name.replace(" ", "_")):
                if parser.has_option(section, variant):
                    return parser.get(section, variant)
        return None

    monhost = option("global", "mon host")
    keyring = option("client", "keyring") or option("global", "keyring")
    if not monhost or not keyring:
        raise SettingsError(f"RUCHER_CEPH_CONF={str(path)!r} names no 'mon host' or 'keyring'")
    key = ""
    try:
        for line in Path(keyring).read_text().splitlines():
            name, _, value = line.strip().partition(" = ")
            if name == "key":
                key = value.strip()
    except OSError as err:
        raise SettingsError(f"the keyring {keyring} of RUCHER_CEPH_CONF cannot be read") from err
    if not key:
        raise SettingsError(f"the keyring {keyring} of RUCHER_CEPH_CONF holds no key")
    definition = StorageDefinition(
        storage=storage,
        storage_type=StorageType.RBD,
        content=(ContentType.IMAGES, ContentType.ROOTDIR),
        shared=True,
        pool=pool,
        monhost=(monhost.strip(),),
        username="admin",
    )
    return CephSeed(definition=definition, key=key)
