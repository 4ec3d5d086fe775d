"""The GPU broker's small parts: MIG choice, hostdev XML, settings, array parameters, bench."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rucher.gpu.config import GpuSettings
from rucher.gpu.drivers.nvml import load_pynvml, pci_address
from rucher.gpu.hostdev import mdev_hostdev, pci_hostdev
from rucher.gpu.mig import choose_mig, first_fit, geometry_of
from rucher.gpu.pciids import PciNames
from rucher.proto.gpu import MigPlacement
from rucher.pve.params import DUPLICATE, ParamError, merge, parse_json, validate
from rucher.pve.schema import Param, ParamsSpec
from rucher.service import Settings, SettingsError

from .test_placement_mig import h200_profiles, h200_totals

ROOT = Path(__file__).resolve().parents[2]


def test_the_broker_keeps_empty_gpus_whole_where_first_fit_does_not():
    shape = geometry_of(h200_profiles())
    half = shape.best_placement(0, "3g.71gb")
    assert half is not None
    gpus = [(shape, 0), (shape, half[1])]
    choice = choose_mig(gpus, "1g.18gb")
    assert choice is not None and choice.gpu == 1  # the GPU already in use takes it
    baseline = first_fit(gpus, "1g.18gb")
    assert baseline is not None and baseline.gpu == 0
    assert baseline.placement == MigPlacement(start=0, size=1)
    full = [(shape, shape.best_placement(0, "7g.141gb")[1])]  # type: ignore[index]
    assert choose_mig(full, "1g.18gb") is None and first_fit(full, "1g.18gb") is None


def test_hostdev_xml_names_the_function_or_the_mdev():
    assert "domain='0x0000' bus='0x41' slot='0x00' function='0x1'" in pci_hostdev("0000:41:00.1")
    assert "managed='no'" in pci_hostdev("0000:41:00.1")
    xml = mdev_hostdev("3e23c051-3e44-4eac-9afb-e70d14fe86b4")
    assert "type='mdev'" in xml and "uuid='3e23c051-3e44-4eac-9afb-e70d14fe86b4'" in xml


def test_nvml_bus_ids_become_kernel_addresses():
    assert pci_address("00000000:00:06.0") == "0000:00:06.0"
    assert pci_address("00000001:41:00.0") == "0001:41:00.0"


def test_settings_name_the_variable_at_fault(tmp_path):
    base = Settings.from_env("gpu", {})
    settings = GpuSettings.from_env(base, {"RUCHER_GPU_SYSFS_ROOT": str(tmp_path)})
    assert settings.sysfs_root == tmp_path and settings.nvml == "auto"
    with pytest.raises(SettingsError, match="RUCHER_GPU_SYSFS_ROOT"):
        GpuSettings.from_env(base, {"RUCHER_GPU_SYSFS_ROOT": str(tmp_path / "none")})
    with pytest.raises(SettingsError, match="RUCHER_GPU_NVML"):
        GpuSettings.from_env(base, {"RUCHER_GPU_NVML": "maybe"})


def test_without_a_driver_nvml_is_simply_absent():
    library = load_pynvml()
    if library is not None:
        library.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    assert library is None


def test_array_parameters_collect_every_value():
    merged = merge([("id", "m")], [("map", "a"), ("map", "b")], repeatable=frozenset({"map"}))
    assert merged == {"id": "m", "map": ("a", "b")}
    assert merge([("map", "a")], repeatable=frozenset({"map"})) == {"map": ("a",)}
    with pytest.raises(ParamError) as caught:
        merge([("id", "a"), ("id", "b")], repeatable=frozenset({"map"}))
    assert caught.value.errors == {"id": DUPLICATE}
    assert parse_json(b'{"map": ["a", "b"]}') == [("map", "a"), ("map", "b")]
    spec = ParamsSpec(
        properties={
            "map": Param(type="array", items=Param(type="string", pattern="^[a-z]+$")),
            "id": Param(type="string", optional=True),
        }
    )
    params = validate(spec, {"map": ("a", "b"), "id": "x"}, formats={})
    assert params["map"] == ["a", "b"]
    assert validate(spec, {"map": "a"}, formats={})["map"] == ["a"]
    with pytest.raises(ParamError) as caught:
        validate(spec, {"map": ("a", "B")}, formats={})
    assert "map" in caught.value.errors


def test_the_benchmark_uses_the_h200_table_of_the_fixture():
    folder = ROOT / "ops" / "bench"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", folder / "gpu.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = bench  # dataclasses resolve their module by name
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("bench_gpu", None)
    table = {p.name: (p.profile_id, p.max_instances, p.placements) for p in bench.H200_PROFILES}
    real = {p.name: (p.profile_id, p.max_instances, p.placements) for p in h200_profiles()}
    assert table == real
    assert {name: count for name, (_, count, _) in table.items()} == h200_totals()
    requests = bench.stream(4000, 4, 1.2, 3)
    broker = bench.replay(requests, 4, bench.choose_mig, strict=True)
    baseline = bench.replay(requests, 4, bench.first_fit, strict=False)
    assert broker.satisfied >= baseline.satisfied * 0.98


PCI_IDS = """\
# a cut of pci.ids
10de  NVIDIA Corporation
\t2335  GH100 [H200 SXM 141GB]
\t\t10de 18bf  H200 SXM 141GB
\t26b9  AD102GL [L40S]
1af4  Red Hat, Inc.
\t1042  Virtio 1.0 block device
C 03  Display controller
\t00  VGA compatible controller
"""


def test_names_come_from_pci_ids_for_the_ids_present(tmp_path):
    path = tmp_path / "pci.ids"
    path.write_text(PCI_IDS)
    names = PciNames(path)
    names.learn({("10de", "2335")})
    assert names.names("10de", "2335") == ("NVIDIA Corporation", "GH100 [H200 SXM 141GB]")
    assert names.names("1af4", "1042") == ("", "")  # not present on the node: not kept
    names.learn({("1af4", "1042")})
    assert names.names("1af4", "1042") == ("Red Hat, Inc.", "Virtio 1.0 block device")
    assert PciNames(None).names("10de", "2335") == ("", "")
