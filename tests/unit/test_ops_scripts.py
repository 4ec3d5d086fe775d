"""The ops/ scripts: the Debian 12 check, strict bash, and how ops/test reports failures."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["install", "up", "down", "test", "harness"]

DEBIAN_12 = """PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION_CODENAME=bookworm
ID=debian
"""
DEBIAN_11 = DEBIAN_12.replace("12 (bookworm)", "11 (bullseye)").replace('"12"', '"11"')
UBUNTU = """PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
ID=ubuntu
ID_LIKE=debian
"""


def require_debian12(os_release: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "source ops/lib.sh && require_debian12"],
        env={**os.environ, "RUCHER_OS_RELEASE": str(os_release)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    "text", [DEBIAN_12, DEBIAN_12.replace('"', ""), "ID='debian'\nVERSION_ID='12'\n"]
)
def test_debian_12_passes(tmp_path, text):
    os_release = tmp_path / "os-release"
    os_release.write_text(text)

    assert require_debian12(os_release).returncode == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (DEBIAN_11, "Debian GNU/Linux 11 (bullseye)"),
        (UBUNTU, "Ubuntu 22.04.4 LTS"),
        ("", "unknown"),
    ],
)
def test_other_systems_are_refused_with_a_clear_message(tmp_path, text, named):
    os_release = tmp_path / "os-release"
    os_release.write_text(text)

    result = require_debian12(os_release)

    assert result.returncode == 1
    assert "support Debian 12 (bookworm) only" in result.stderr
    assert named in result.stderr


def test_a_missing_os_release_is_refused(tmp_path):
    result = require_debian12(tmp_path / "absent")

    assert result.returncode == 1
    assert "cannot read" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_ops_script_checks_the_system_before_doing_anything(tmp_path, script):
    os_release = tmp_path / "os-release"
    os_release.write_text(UBUNTU)
    env = {**os.environ, "RUCHER_OS_RELEASE": str(os_release)}

    result = subprocess.run(
        [ROOT / "ops" / script, "--help"], env=env, capture_output=True, text=True, check=False
    )

    assert result.returncode == 1
    assert "support Debian 12 (bookworm) only" in result.stderr


@pytest.mark.parametrize("script", ["ops/install", "ops/up", "ops/down", "ops/test",
                                    "ops/harness", ".ci/run"])  # fmt: skip
def test_scripts_are_strict_executable_bash(script):
    path = ROOT / script
    text = path.read_text()

    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert path.stat().st_mode & stat.S_IXUSR
    assert subprocess.run(["bash", "-n", path], check=False).returncode == 0


def test_ci_runs_exactly_ops_test():
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith("#")]  # fmt: skip

    assert lines[-1] == 'exec ops/test "$@"'


def fake_checkout(tmp_path: Path, rcs: dict[str, int]) -> Path:
    """A checkout whose ops/test finds stub tools: each logs its arguments, exits rcs[tool]."""
    root = tmp_path / "checkout"
    (root / "ops").mkdir(parents=True)
    for name in ["lib.sh", "test"]:
        shutil.copy2(ROOT / "ops" / name, root / "ops" / name)
    venv = root / ".venv" / "bin"
    stubs = {
        "install": root / "ops",
        "ruff": venv,
        "lint-imports": venv,
        "mypy": venv,
        "pytest": venv,
    }
    for tool, folder in stubs.items():
        folder.mkdir(parents=True, exist_ok=True)
        stub = folder / tool
        stub.write_text(
            "#!/usr/bin/env bash\n"
            f'echo "{tool} $* RUCHER_NATS_URL=${{RUCHER_NATS_URL:-unset}}" >> "{tmp_path}/calls"\n'
            f"exit {rcs.get(tool, 0)}\n"
        )
        stub.chmod(0o755)
    return root


def run_ops_test(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUCHER_NATS_URL": "nats://127.0.0.1:4222"}  # as if ops/up's stack ran
    return subprocess.run(
        [root / "ops" / "test", *args], env=env, capture_output=True, text=True, check=False
    )


def test_ops_test_runs_every_step_and_passes_arguments_to_pytest(tmp_path):
    root = fake_checkout(tmp_path, {})

    result = run_ops_test(root, "-k", "bus")

    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert [call.split()[0] for call in calls] == [
        "install",
        "ruff",
        "ruff",
        "lint-imports",
        "mypy",
        "pytest",
    ]
    assert calls[0].startswith("install --dev")
    assert calls[-1].startswith("pytest -k bus ")
    assert all(call.endswith("RUCHER_NATS_URL=unset") for call in calls[1:])


@pytest.mark.parametrize(
    ("rcs", "reported"),
    [
        ({"pytest": 5}, "pytest (exit 5: no tests were collected)"),
        ({"pytest": 1}, "pytest (exit 1)"),
        ({"mypy": 1}, "mypy (exit 1)"),
        (
            {"ruff": 1, "lint-imports": 2},
            "ruff check (exit 1), ruff format (exit 1), lint-imports (exit 2)",
        ),
    ],
)
def test_ops_test_fails_when_any_step_fails(tmp_path, rcs, reported):
    root = fake_checkout(tmp_path, rcs)

    result = run_ops_test(root)

    assert result.returncode == 1
    assert reported in result.stderr
    assert "pytest" in (tmp_path / "calls").read_text()  # later steps still ran


def test_ops_test_stops_when_install_fails(tmp_path):
    root = fake_checkout(tmp_path, {"install": 3})

    result = run_ops_test(root)

    assert result.returncode == 3
    assert (tmp_path / "calls").read_text().split()[0] == "install"
