"""A libvirtd for development and tests, started by hand (no systemd), and a pytest fixture.

``python -m rucher.testing.libvirt up|down|status`` (run by ``ops/libvirt``) configures QEMU to
run as root (disk images live in Rucher's own folders), makes ``/dev/kvm`` usable by the
``kvm`` group (libvirt otherwise re-probes QEMU on every define, about 44 s), starts virtlogd
then libvirtd, and creates the isolated bridge ``vmbr0`` when it is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SYSTEM_URI = "qemu:///system"
DEFAULT_BRIDGE = "vmbr0"
START_PATIENCE = 30.0
STOP_PATIENCE = 15.0
MARK = "# managed by rucher ops/libvirt"


@dataclass(frozen=True)
class Daemon:
    """Where one libvirtd keeps its configuration, sockets and pid files."""

    etc: Path = Path("/etc/libvirt")
    run: Path = Path("/run")
    bridge: str = DEFAULT_BRIDGE
    settings: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "qemu.conf": {"user": '"+0"', "group": '"+0"', "security_driver": '"none"'},
        }
    )

    @property
    def socket(self) -> Path:
        """The read-write UNIX socket of libvirtd."""
        return self.run / "libvirt" / "libvirt-sock"

    def pidfile(self, program: str) -> Path:
        """The pid file ``program`` (virtlogd, libvirtd) writes when run with ``-d``."""
        return self.run / f"{program}.pid"


def _set_options(path: Path, options: dict[str, str]) -> bool:
    """Set ``key = value`` lines in a libvirt config file; True when the file changed."""
    text = path.read_text() if path.exists() else ""
    lines = [
        line
        for line in text.splitlines()
        if not any(re.match(rf"^\s*{re.escape(key)}\s*=", line) for key in options)
    ]
    lines = [line for line in lines if line != MARK]
    lines.append(MARK)
    lines.extend(f"{key} = {value}" for key, value in options.items())
    new = "\n".join(lines) + "\n"
    if new == text:
        return False
    path.write_text(new)
    return True


def _host_uuid(daemon: Daemon) -> str:
    """The host UUID libvirtd needs here: these machines have no SMBIOS UUID to read."""
    current = daemon.etc / "libvirtd.conf"
    if current.exists():
        found = re.search(r'^host_uuid\s*=\s*"([0-9a-f-]{36})"', current.read_text(), re.M)
        if found:
            return found.group(1)
    return str(uuid.uuid4())


def configure(daemon: Daemon) -> None:
    """Write Rucher's settings into the daemon's qemu.conf and libvirtd.conf."""
    for name, options in daemon.settings.items():
        _set_options(daemon.etc / name, options)
    _set_options(daemon.etc / "libvirtd.conf", {"host_uuid": f'"{_host_uuid(daemon)}"'})


def fix_kvm_permissions(device: Path = Path("/dev/kvm")) -> None:
    """Let the ``kvm`` group open /dev/kvm, as Debian's udev rule would (there is no udev)."""
    if not device.exists():
        return
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(device, -1, grp.getgrnam("kvm").gr_gid)
        os.chmod(device, 0o660)


def ensure_bridge(name: str) -> None:
    """Create the isolated Linux bridge ``name`` (no uplink) and bring it up, unless it exists."""
    if not Path(f"/sys/class/net/{name}").exists():
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def answers(daemon: Daemon) -> bool:
    """Whether libvirtd accepts connections on its socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(daemon.socket))
        except OSError:
            return False
    return True


def _running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(daemon: Daemon) -> None:
    """Start virtlogd and libvirtd unless libvirtd answers; create the bridge."""
    fix_kvm_permissions()
    ensure_bridge(daemon.bridge)
    if answers(daemon):
        return
    configure(daemon)
    if _running(daemon.pidfile("virtlogd")) is None:
        subprocess.run(["virtlogd", "-d"], check=True)
    if _running(daemon.pidfile("libvirtd")) is None:
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + START_PATIENCE
    while not answers(daemon):
        if time.monotonic() > deadline:
            message = f"libvirtd did not answer on {daemon.socket} within {START_PATIENCE} s"
            raise RuntimeError(message)
        time.sleep(0.1)


def down(daemon: Daemon) -> None:
    """Stop libvirtd then virtlogd (SIGTERM, then SIGKILL after a while)."""
    for program in ("libvirtd", "virtlogd"):
        pid = _running(daemon.pidfile(program))
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_PATIENCE
        while _running(daemon.pidfile(program)) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            if _running(daemon.pidfile(program)) == pid:
                os.kill(pid, signal.SIGKILL)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "libvirtd needs root"
    for program in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
        if not any(Path(folder, program).exists() for folder in ("/usr/sbin", "/usr/bin")):
            return f"{program} is not installed (run ops/libvirt install)"
    return None


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """A running system libvirtd (started if needed, left running); yields its URI."""
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)
    up(Daemon())
    return SYSTEM_URI


@dataclass(frozen=True)
class GuestImage:
    """The test guest built by ``ops/build-guest``: a kernel and a busybox initramfs."""

    kernel: Path
    initrd: Path
    cmdline: str = "console=ttyS0 quiet panic=-1"
    banner: str = "rucher-guest: up"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Build the test guest once (cached in build/guest) and return its files."""
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [str(root / "ops" / "build-guest"), "--print-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"ops/build-guest failed: {result.stderr.strip()}")
    folder = Path(result.stdout.strip().splitlines()[-1])
    return GuestImage(kernel=folder / "vmlinux", initrd=folder / "initramfs.cpio")


def main(argv: list[str] | None = None) -> int:
    """``up``, ``down`` or ``status`` of this machine's libvirtd."""
    parser = argparse.ArgumentParser(prog="rucher.testing.libvirt")
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE)
    args = parser.parse_args(argv)
    daemon = Daemon(bridge=args.bridge)
    if args.command == "up":
        up(daemon)
        sys.stdout.write(f"libvirtd answers on {daemon.socket}; bridge {daemon.bridge} is up\n")
    elif args.command == "down":
        down(daemon)
    else:
        running = answers(daemon)
        sys.stdout.write(
            f"libvirtd {'answers' if running else 'is not running'} on {daemon.socket}\n"
        )
        return 0 if running else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
