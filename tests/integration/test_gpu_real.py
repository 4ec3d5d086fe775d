"""Discovery against this machine's real sysfs and, where there is one, its real NVIDIA GPU.

Read-only: the sysfs handed to discovery refuses every write, and MIG mode is compared before
and after. With an NVIDIA driver the GPU's discovery is kept as a fixture
(``RUCHER_GPU_FIXTURE_OUT``, else the test's temporary folder); without one only the GPU test
skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from rucher.gpu.drivers.nvml import PynvmlApi, load_pynvml
from rucher.gpu.drivers.sysfs import HostSysfs
from rucher.gpu.host import discover
from rucher.gpu.mig import geometry_of

pytestmark = pytest.mark.integration

SYSFS = Path("/sys")


class ReadOnlySysfs(HostSysfs):
    """The host's sysfs with every write refused: discovery must never write."""

    def write(self, path: str, value: str) -> None:
        """Refuse."""
        raise AssertionError(f"discovery wrote {value!r} to {path}")


@pytest.mark.skipif(not (SYSFS / "bus" / "pci" / "devices").is_dir(), reason="no PCI sysfs")
def test_discovery_reads_this_machines_pci_functions():
    devices, version = discover(ReadOnlySysfs(SYSFS), None)
    assert version is None
    listed = sorted(os.listdir(SYSFS / "bus" / "pci" / "devices"))
    assert sorted(d.address for d in devices) == listed
    for device in devices:
        raw = (SYSFS / "bus" / "pci" / "devices" / device.address / "vendor").read_text()
        assert device.vendor_id == raw.strip().removeprefix("0x")
        if device.iommu_group is not None:
            assert device.address in device.iommu_group_members


def test_discovery_reads_the_real_gpu_without_changing_it(tmp_path):
    library = load_pynvml()
    if library is None:
        pytest.skip("no NVIDIA driver on this machine")
    try:
        nvml = PynvmlApi(library)
        before = [(g.address, g.mig_current, g.mig_pending) for g in nvml.gpus()]
        assert before, "NVML loaded but sees no GPU"
        devices, version = discover(ReadOnlySysfs(SYSFS), nvml)
        after = [(g.address, g.mig_current, g.mig_pending) for g in nvml.gpus()]
    finally:
        library.nvmlShutdown()
    assert before == after  # MIG mode untouched
    assert version
    by_address = {d.address: d for d in devices}
    gpus = [by_address[address] for address, _, _ in before if address in by_address]
    assert gpus, "NVML's GPUs are not among the PCI functions"
    for gpu in gpus:
        assert gpu.uuid and gpu.uuid.startswith("GPU-") and gpu.memory
        assert gpu.vendor_id == "10de" and gpu.class_code.startswith("03")
        if gpu.mig_enabled:
            assert gpu.mig_profiles and all(p.placements for p in gpu.mig_profiles)
            geometry_of(gpu.mig_profiles)  # the shared geometry accepts the real table
    out = Path(os.environ.get("RUCHER_GPU_FIXTURE_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    document = {"driver": version, "devices": msgspec.to_builtins(gpus)}
    (out / "discovery.json").write_text(json.dumps(document, indent=1, sort_keys=True))
