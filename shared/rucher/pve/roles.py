"""Proxmox VE's privileges and built-in roles, derived the way PVE::AccessControl derives them.

Proxmox groups every privilege of a category into four tiers (``root``: only root and the
Administrator role, ``admin``, ``user``, ``audit``) and builds the special roles from the tiers:
``PVE{cat}Admin`` holds admin+user+audit, ``PVE{cat}User`` user+audit (only where the category
has user privileges), ``PVEAdmin`` every category's admin+user+audit except ``Mapping.Modify``,
``PVEAuditor`` every audit privilege, ``Administrator`` every privilege, ``NoAccess`` none.
The tiers follow Proxmox VE 9 (``VM.Monitor`` replaced by the ``VM.GuestAgent.*`` privileges);
``VM.Replicate`` is the privilege the 9.1 API requires for replication jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class PrivilegeTiers:
    """One category's privileges by who may hold them."""

    root: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    user: tuple[str, ...] = ()
    audit: tuple[str, ...] = ()


PRIVILEGE_GROUPS: MappingProxyType[str, PrivilegeTiers] = MappingProxyType(
    {
        "VM": PrivilegeTiers(
            admin=(
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.HWType",
                "VM.Config.Options",
                "VM.Allocate",
                "VM.Clone",
                "VM.GuestAgent.Unrestricted",
                "VM.Migrate",
                "VM.Replicate",
                "VM.Snapshot",
                "VM.Snapshot.Rollback",
            ),
            user=(
                "VM.Config.CDROM",
                "VM.Config.Cloudinit",
                "VM.Console",
                "VM.Backup",
                "VM.GuestAgent.FileRead",
                "VM.GuestAgent.FileSystemMgmt",
                "VM.GuestAgent.FileWrite",
                "VM.PowerMgmt",
            ),
            audit=("VM.Audit", "VM.GuestAgent.Audit"),
        ),
        "Sys": PrivilegeTiers(
            root=("Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming", "Sys.AccessNetwork"),
            admin=("Sys.Console", "Sys.Syslog"),
            audit=("Sys.Audit",),
        ),
        "Datastore": PrivilegeTiers(
            admin=("Datastore.Allocate", "Datastore.AllocateTemplate"),
            user=("Datastore.AllocateSpace",),
            audit=("Datastore.Audit",),
        ),
        "SDN": PrivilegeTiers(
            admin=("SDN.Allocate", "SDN.Audit"),
            user=("SDN.Use",),
            audit=("SDN.Audit",),
        ),
        "User": PrivilegeTiers(
            root=("Realm.Allocate",),
            admin=("User.Modify", "Group.Allocate", "Realm.AllocateUser"),
        ),
        "Pool": PrivilegeTiers(
            admin=("Pool.Allocate",),
            user=("Pool.Audit",),
            audit=("Pool.Audit",),
        ),
        "Mapping": PrivilegeTiers(
            admin=("Mapping.Modify",),
            user=("Mapping.Use",),
            audit=("Mapping.Audit",),
        ),
    }
)

# Not part of any category: only Administrator (and custom roles) hold it.
STANDALONE_PRIVILEGES = ("Permissions.Modify",)

ADMINISTRATOR = "Administrator"
NO_ACCESS = "NoAccess"
ROOT_USER = "root@pam"


def _build() -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    every: set[str] = set(STANDALONE_PRIVILEGES)
    roles: dict[str, set[str]] = {"PVEAdmin": set(), "PVEAuditor": set()}
    for category, tiers in PRIVILEGE_GROUPS.items():
        every.update(tiers.root, tiers.admin, tiers.user, tiers.audit)
        held = {*tiers.admin, *tiers.user, *tiers.audit}
        roles[f"PVE{category}Admin"] = set(held)
        roles["PVEAdmin"] |= held
        if tiers.user:
            roles[f"PVE{category}User"] = {*tiers.user, *tiers.audit}
        roles["PVEAuditor"].update(tiers.audit)
    # Proxmox keeps resource mappings to Administrator, root and PVEMappingAdmin for now.
    roles["PVEAdmin"].discard("Mapping.Modify")
    roles["PVETemplateUser"] = {"VM.Clone", "VM.Audit"}
    roles[ADMINISTRATOR] = set(every)
    roles[NO_ACCESS] = set()
    return frozenset(every), {name: frozenset(privs) for name, privs in sorted(roles.items())}


ALL_PRIVILEGES, _BUILTIN = _build()

BUILTIN_ROLES: MappingProxyType[str, frozenset[str]] = MappingProxyType(_BUILTIN)
"""Every built-in ("special") role and its privileges; these cannot be changed or deleted."""


def is_builtin_role(roleid: str) -> bool:
    """Whether ``roleid`` names one of Proxmox's built-in roles."""
    return roleid in BUILTIN_ROLES


def invalid_privileges(privileges: tuple[str, ...] | list[str] | frozenset[str]) -> list[str]:
    """The names in ``privileges`` that are not Proxmox privileges, in the order given."""
    return [name for name in privileges if name not in ALL_PRIVILEGES]
