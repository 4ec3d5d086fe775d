"""Every service in the tree is installed, type-checked and placed in the import layers."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVICES = sorted(path.name for path in (ROOT / "services").iterdir() if path.is_dir())


def test_there_are_services():
    assert "gateway" in SERVICES


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_installed_by_requirements(service):
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith(f"-e ./services/{service} ") for line in lines)


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_type_checked(service):
    mypy = CONFIG["tool"]["mypy"]
    assert f"services/{service}" in mypy["mypy_path"]
    assert f"services/{service}/rucher" in mypy["files"]


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_an_independent_top_layer(service):
    (contract,) = CONFIG["tool"]["importlinter"]["contracts"]
    top = [name.strip(" ()") for name in contract["layers"][0].split("|")]
    assert service in top
