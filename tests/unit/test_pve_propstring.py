"""Proxmox property strings parsed and written with the formats of the extracted schema."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rucher.pve.propstring import PropertyStringError, format_string, parse, split

from .pve_fixtures import schema


def fmt(name: str):
    return schema().formats[name]


def test_a_nic_with_a_model_alias_for_its_mac():
    text = "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1"
    values = parse(text, fmt("qemu-net"))
    assert values == {
        "model": "virtio",
        "macaddr": "BC:24:11:00:00:01",
        "bridge": "vmbr0",
        "firewall": True,
    }
    assert format_string(values, fmt("qemu-net")) == text


def test_a_bare_default_key_and_explicit_keys_mean_the_same():
    net = fmt("qemu-net")
    assert parse("virtio,bridge=vmbr0", net) == parse("model=virtio,bridge=vmbr0", net)
    assert format_string({"model": "e1000", "tag": 5}, net) == "e1000,tag=5"


def test_a_new_disk_as_storage_and_size():
    scsi = fmt("qemu-scsi")
    assert parse("local-lvm:32", scsi) == {"file": "local-lvm:32"}
    values = parse("local:32,ssd=1,discard=on,iothread=0", scsi)
    assert values == {"file": "local:32", "ssd": True, "discard": "on", "iothread": False}
    assert format_string(values, scsi) == "local:32,discard=on,iothread=0,ssd=1"


def test_gpu_passthrough_by_mapping_and_by_address():
    hostpci = fmt("pve-qm-hostpci")
    values = parse("mapping=gpu0,mdev=nvidia-xxx,pcie=1", hostpci)
    assert values == {"mapping": "gpu0", "mdev": "nvidia-xxx", "pcie": True}
    assert format_string(values, hostpci) == "mapping=gpu0,mdev=nvidia-xxx,pcie=1"
    assert parse("0000:01:00.0,x-vga=1", hostpci) == {"host": "0000:01:00.0", "x-vga": True}


def test_container_root_and_nic():
    assert parse("local:8", fmt("lxc-rootfs")) == {"volume": "local:8"}
    values = parse("name=eth0,bridge=vmbr0,ip=dhcp", fmt("lxc-net"))
    assert values == {"name": "eth0", "bridge": "vmbr0", "ip": "dhcp"}
    assert format_string(values, fmt("lxc-net")) == "name=eth0,bridge=vmbr0,ip=dhcp"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("qemu-net", "virtio,colour=red", "invalid key in comma-separated list property: colour"),
        ("qemu-net", "virtio,bridge=a,bridge=b", "duplicate key"),
        ("qemu-net", "virtio,e1000", "duplicate key in comma-separated list property: model"),
        ("qemu-net", "virtio=01:00:00:00:00:01", "unicast MAC"),
        ("qemu-net", "virtio,tag=5000", "tag: value must have a maximum value of 4094"),
        ("qemu-net", "virtio,firewall=perhaps", "firewall: type check ('boolean') failed"),
        ("qemu-net", "bridge=vmbr0", "model: property is missing and it is not optional"),
        ("qemu-net", "e1000,=x", "missing key"),
        ("lxc-net", "eth0", "schema does not define a default key"),
        ("lxc-net", "bridge=vmbr0", "name: property is missing"),
        ("lxc-net", "name=eth0,ip=10.0.0.1", "valid IPv4 network config"),
        ("lxc-rootfs", "/a/../b", "illegal character sequences"),
        ("qemu-scsi", "local:32,cache=fast", "does not have a value in the enumeration"),
    ],
)
def test_invalid_property_strings_say_what_is_wrong(name, text, message):
    with pytest.raises(PropertyStringError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text, fmt(name))


def test_split_keeps_raw_values():
    assert split("virtio=BC:24:11:00:00:01,queues=4", fmt("qemu-net")) == {
        "model": "virtio",
        "macaddr": "BC:24:11:00:00:01",
        "queues": "4",
    }


def test_writing_an_unknown_key_is_refused():
    with pytest.raises(PropertyStringError, match="invalid key 'colour'"):
        format_string({"model": "virtio", "colour": "red"}, fmt("qemu-net"))


_MAC = st.tuples(
    st.sampled_from("02468ACE"), st.lists(st.sampled_from("0123456789ABCDEF"), min_size=11)
).map(lambda parts: _mac("0" + parts[0] + "".join(parts[1][:10])))


def _mac(hex12: str) -> str:
    return ":".join(hex12[i : i + 2] for i in range(0, 12, 2))


@given(
    model=st.sampled_from(["virtio", "e1000", "rtl8139", "vmxnet3"]),
    mac=st.none() | _MAC,
    bridge=st.none() | st.from_regex(r"vmbr[0-9]{1,3}", fullmatch=True),
    firewall=st.none() | st.booleans(),
    tag=st.none() | st.integers(min_value=1, max_value=4094),
    queues=st.none() | st.integers(min_value=0, max_value=64),
)
def test_nics_round_trip(model, mac, bridge, firewall, tag, queues):
    values = {
        key: value
        for key, value in {
            "model": model,
            "macaddr": mac,
            "bridge": bridge,
            "firewall": firewall,
            "tag": tag,
            "queues": queues,
        }.items()
        if value is not None
    }
    text = format_string(values, fmt("qemu-net"))
    assert parse(text, fmt("qemu-net")) == values
