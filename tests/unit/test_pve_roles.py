"""Built-in roles and privileges, checked against Proxmox VE's own expectations."""

from __future__ import annotations

from rucher.pve.roles import ALL_PRIVILEGES, BUILTIN_ROLES, invalid_privileges, is_builtin_role

# Proxmox VE 9's perm-test1: Administrator on a path (sorted), plus 9.1's VM.Replicate.
ADMINISTRATOR = (
    "Datastore.Allocate,Datastore.AllocateSpace,Datastore.AllocateTemplate,Datastore.Audit,"
    "Group.Allocate,Mapping.Audit,Mapping.Modify,Mapping.Use,Permissions.Modify,"
    "Pool.Allocate,Pool.Audit,Realm.Allocate,Realm.AllocateUser,SDN.Allocate,SDN.Audit,SDN.Use,"
    "Sys.AccessNetwork,Sys.Audit,Sys.Console,Sys.Incoming,Sys.Modify,Sys.PowerMgmt,Sys.Syslog,"
    "User.Modify,VM.Allocate,VM.Audit,VM.Backup,VM.Clone,VM.Config.CDROM,VM.Config.CPU,"
    "VM.Config.Cloudinit,VM.Config.Disk,VM.Config.HWType,VM.Config.Memory,VM.Config.Network,"
    "VM.Config.Options,VM.Console,VM.GuestAgent.Audit,VM.GuestAgent.FileRead,"
    "VM.GuestAgent.FileSystemMgmt,VM.GuestAgent.FileWrite,VM.GuestAgent.Unrestricted,"
    "VM.Migrate,VM.PowerMgmt,VM.Replicate,VM.Snapshot,VM.Snapshot.Rollback"
)
# Proxmox VE 9's perm-test1: PVEVMAdmin, which lacks Permissions.Modify (plus VM.Replicate).
PVE_VM_ADMIN = (
    "VM.Allocate,VM.Audit,VM.Backup,VM.Clone,VM.Config.CDROM,VM.Config.CPU,VM.Config.Cloudinit,"
    "VM.Config.Disk,VM.Config.HWType,VM.Config.Memory,VM.Config.Network,VM.Config.Options,"
    "VM.Console,VM.GuestAgent.Audit,VM.GuestAgent.FileRead,VM.GuestAgent.FileSystemMgmt,"
    "VM.GuestAgent.FileWrite,VM.GuestAgent.Unrestricted,VM.Migrate,VM.PowerMgmt,VM.Replicate,"
    "VM.Snapshot,VM.Snapshot.Rollback"
)


def joined(role: str) -> str:
    return ",".join(sorted(BUILTIN_ROLES[role]))


def test_every_builtin_role_of_proxmox_exists_and_nothing_else():
    assert set(BUILTIN_ROLES) == {
        "Administrator",
        "NoAccess",
        "PVEAdmin",
        "PVEAuditor",
        "PVEDatastoreAdmin",
        "PVEDatastoreUser",
        "PVEMappingAdmin",
        "PVEMappingUser",
        "PVEPoolAdmin",
        "PVEPoolUser",
        "PVESDNAdmin",
        "PVESDNUser",
        "PVESysAdmin",
        "PVETemplateUser",
        "PVEUserAdmin",
        "PVEVMAdmin",
        "PVEVMUser",
    }


def test_administrator_holds_every_privilege_and_matches_proxmox():
    assert joined("Administrator") == ADMINISTRATOR
    assert BUILTIN_ROLES["Administrator"] == ALL_PRIVILEGES
    assert "VM.Monitor" not in ALL_PRIVILEGES  # dropped in Proxmox VE 9


def test_vm_admin_matches_proxmox():
    assert joined("PVEVMAdmin") == PVE_VM_ADMIN


def test_smaller_roles():
    assert BUILTIN_ROLES["NoAccess"] == frozenset()
    assert joined("PVEVMUser") == (
        "VM.Audit,VM.Backup,VM.Config.CDROM,VM.Config.Cloudinit,VM.Console,VM.GuestAgent.Audit,"
        "VM.GuestAgent.FileRead,VM.GuestAgent.FileSystemMgmt,VM.GuestAgent.FileWrite,"
        "VM.PowerMgmt"
    )
    assert joined("PVEAuditor") == (
        "Datastore.Audit,Mapping.Audit,Pool.Audit,SDN.Audit,Sys.Audit,VM.Audit,VM.GuestAgent.Audit"
    )
    assert joined("PVEDatastoreUser") == "Datastore.AllocateSpace,Datastore.Audit"
    assert joined("PVEDatastoreAdmin") == (
        "Datastore.Allocate,Datastore.AllocateSpace,Datastore.AllocateTemplate,Datastore.Audit"
    )
    assert joined("PVETemplateUser") == "VM.Audit,VM.Clone"
    assert joined("PVEPoolUser") == "Pool.Audit"
    assert joined("PVEPoolAdmin") == "Pool.Allocate,Pool.Audit"
    assert joined("PVESysAdmin") == "Sys.Audit,Sys.Console,Sys.Syslog"
    assert joined("PVEUserAdmin") == "Group.Allocate,Realm.AllocateUser,User.Modify"
    assert joined("PVESDNUser") == "SDN.Audit,SDN.Use"
    assert joined("PVEMappingUser") == "Mapping.Audit,Mapping.Use"
    assert joined("PVEMappingAdmin") == "Mapping.Audit,Mapping.Modify,Mapping.Use"


def test_pve_admin_is_everything_but_root_privileges_and_mapping_changes():
    missing = ALL_PRIVILEGES - BUILTIN_ROLES["PVEAdmin"]
    assert missing == {
        "Mapping.Modify",
        "Permissions.Modify",
        "Realm.Allocate",
        "Sys.AccessNetwork",
        "Sys.Incoming",
        "Sys.Modify",
        "Sys.PowerMgmt",
    }


def test_privilege_validation_names_the_unknown_ones():
    assert invalid_privileges(["VM.Audit", "VM.Monitor", "Nope"]) == ["VM.Monitor", "Nope"]
    assert invalid_privileges(sorted(ALL_PRIVILEGES)) == []
    assert is_builtin_role("PVEAdmin") and not is_builtin_role("custom")
