"""libvirt domains whose cloud-init seed image is (re)built whenever they are defined.

The domain definition carries the seed's files in its ``rucher:cloudinit`` metadata (written by
``domain_xml``); defining such a domain first writes them into an ISO 9660 image labelled
``cidata`` (``genisoimage``, Joliet and Rock Ridge) at the path the metadata names, atomically.
Undefining the domain removes its image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rucher.bus import RucherError
from rucher.compute.domain_xml import NAMESPACE, vmid_of
from rucher.compute.drivers.libvirt import LibvirtHypervisor
from rucher.proto.errors import ErrorCode

SEED_SUFFIX = "-cidata.iso"


def seed_of(xml: str) -> tuple[Path, dict[str, str]] | None:
    """The image path and files a domain definition asks for, or None."""
    # Rendered by this agent's own domain_xml: trusted, and without entities.
    root = ET.fromstring(xml)  # noqa: S314
    element = root.find(f"metadata/{{{NAMESPACE}}}cloudinit")
    if element is None:
        return None
    files = {
        str(item.get("name")): item.text or "" for item in element.findall(f"{{{NAMESPACE}}}file")
    }
    return Path(str(element.get("image"))), files


def build_seed(path: Path, files: dict[str, str]) -> None:
    """Write ``files`` into an ISO image labelled ``cidata`` at ``path`` (replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        folder = Path(work) / "seed"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        image = Path(work) / "seed.iso"
        result = subprocess.run(
            ["genisoimage", "-quiet", "-output", str(image), "-volid", "cidata", "-joliet",
             "-rock", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RucherError(
                ErrorCode.INTERNAL, f"cloud-init seed not built: {result.stderr.strip()}"
            )
        os.chmod(image, 0o644)
        os.replace(image, path)


class CloudInitHypervisor(LibvirtHypervisor):
    """A :class:`LibvirtHypervisor` that materialises cloud-init seeds on define."""

    def __init__(self, uri: str, *, seed_dir: Path, **options: Any) -> None:
        super().__init__(uri, **options)
        self.seed_dir = seed_dir

    async def define(self, xml: str) -> None:
        """Build the seed image the definition names (if any), then define the domain."""
        seed = seed_of(xml)
        if seed is not None:
            try:
                await asyncio.to_thread(build_seed, *seed)
            except FileNotFoundError as err:
                raise RucherError(
                    ErrorCode.UNSUPPORTED,
                    "genisoimage is not installed on this node (run ops/libvirt install)",
                ) from err
        await super().define(xml)

    async def undefine(self, name: str) -> None:
        """Undefine the domain and remove its seed image."""
        await super().undefine(name)
        vmid = vmid_of(name)
        if vmid is not None:
            image = self.seed_dir / f"{vmid}{SEED_SUFFIX}"
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(image.unlink)
